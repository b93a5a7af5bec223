"""ZegCLIP in miniature: the offline world's segmenter on the frozen miniature CLIP
(config: :class:`magicseg.core.config.MiniZegModelParams`, ``train.architecture: minizeg``).

Shapes (``C`` tower width, ``E`` text dim, ``h = H/4``, ``P`` = ``vpt_tokens``, ``D`` =
``decoder_dim``, ``K`` classes scored):

    images Bx3xHxW in [0, 1] -> frozen tower stem (no gradient: nothing before it trains)
      -> frozen transformer layers with P learned prompt tokens before each (deep VPT)
      -> BxCxhxw final-LN tokens, BxE global embedding (the tower's own: mean token, projected)
    dense features = frozen text-aligned projection (C->E) + a residual MLP head (C->hidden->E,
      last layer zero-initialised, so training starts from the pretrained alignment), L2-normed
    class queries: the class text features BxKxE (frozen MiniLM), L2-normed, plus a decoder
      correction: Linear E->D, ``decoder_layers`` pre-LN transformer decoder layers (queries
      self-attend, cross-attend to the dense features projected E->D), Linear D->E,
      L2-normalised and scaled by tanh(gate), the gate zero-initialised (the correction starts
      at zero and never outweighs the text); a learned background query first
    logits = exp(logit_scale) x cosine(dense, [background, queries]) (+ a learned background
      bias), Bx(1+K)xhxw, bilinearly upsampled to HxW

Only the prompts, the residual head, the decoder, the background query, the temperature and the
background bias train; the tower is frozen (its parameters get no gradient, a test checks).

Loss (:func:`minizeg_loss`): the offline pixel loss (cross-entropy, background weighted
``train.bg_weight``) plus ``train.cf_weight`` x the counterfactual loss on the same tensors as
the clip model: positives and counterfactuals pass the tower in one batch; ``hinge_head`` on the
tower's global embedding, ``hinge_pixels`` on the mean dense feature, ``cf_background`` through
the decoder with the positive's classes, ``text_margin`` against the class text (same space).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from magicseg.core.errors import ConfigError
from magicseg.model.base import SegmenterOutput
from magicseg.model.losses import embedding_cf_loss, parts, pixel_loss


class MiniZegSegmenter(nn.Module):
    """Prompted frozen miniature-CLIP tower + text-query decoder (see the module docstring)."""

    def __init__(
        self,
        backbone: str,
        text_encoder: str,
        vpt_tokens: int,
        residual_hidden: int,
        decoder_layers: int,
        decoder_heads: int,
        decoder_dim: int,
        text_dim: int,
    ) -> None:
        super().__init__()
        from magicseg.miniclip.model import load_tower

        if decoder_dim % decoder_heads:
            raise ConfigError(
                f"train.minizeg.decoder_dim: {decoder_dim} is not divisible by decoder_heads "
                f"{decoder_heads}"
            )
        tower, blob = load_tower(backbone)
        trained_with = blob.get("meta", {}).get("text_encoder")
        if trained_with != text_encoder or tower.embed_dim != text_dim:
            raise ConfigError(
                f"train.minizeg.backbone: {backbone} was pretrained against the text encoder "
                f"{trained_with!r} ({tower.embed_dim}-d); the segmenter uses {text_encoder!r} "
                f"({text_dim}-d)"
            )
        self.text_dim = text_dim
        self.tower = tower.requires_grad_(False)
        c, e = tower.width, tower.embed_dim
        # 1. Deep prompts (VPT init: uniform(-v, v), v = sqrt(6 / (3 * 8^2 + C))).
        v = math.sqrt(6.0 / (3 * 8**2 + c))
        self.vpt_tokens = vpt_tokens
        self.prompts = nn.Parameter(torch.empty(len(tower.layers), vpt_tokens, c).uniform_(-v, v))
        # 2. The residual head on the dense features: zero at the start.
        self.residual = None
        if residual_hidden:
            self.residual = nn.Sequential(
                nn.Conv2d(c, residual_hidden, 1), nn.GELU(), nn.Conv2d(residual_hidden, e, 1)
            )
            nn.init.zeros_(self.residual[2].weight)
            nn.init.zeros_(self.residual[2].bias)
        # 3. The decoder's correction of the text queries: zero at the start.
        d = decoder_dim
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d, decoder_heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(decoder_layers)
        )
        if decoder_layers:
            self.query_in = nn.Linear(e, d)
            self.memory_in = nn.Linear(e, d)
            self.query_out = nn.Linear(d, e)
            self.query_gate = nn.Parameter(torch.zeros(()))
        self.background = nn.Parameter(torch.randn(e) / math.sqrt(e))
        scale = float(blob.get("logit_scale", 10.0))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(min(max(scale, 1.0), 100.0))))
        self.bg_bias = nn.Parameter(torch.zeros(()))

    def train(self, mode: bool = True) -> MiniZegSegmenter:
        super().train(mode)
        self.tower.eval()  # frozen
        return self

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = images.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), mode="replicate")
        return images, h, w

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded Bx3xHxW -> (BxE global embedding, BxExhxw L2-normalised dense features)."""
        with torch.no_grad():
            feat, x = self.tower.stem_tokens(images)
        prompts = self.prompts if self.vpt_tokens else None
        out = self.tower.encode_tokens(feat, x, prompts)
        dense = self.tower.project(out.tokens)
        if self.residual is not None:
            dense = dense + self.residual(out.tokens)
        return out.glob, F.normalize(dense, dim=1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW -> BxE global embeddings (the tower with its prompts), in the text space."""
        return self.encode(self._pad(images)[0])[0]

    def decode(self, dense: torch.Tensor, class_features: torch.Tensor):
        """BxExhxw dense features, BxKxE class features -> (Bx(1+K)xhxw logits, BxKxE
        L2-normalised class queries)."""
        b = dense.shape[0]
        text = F.normalize(class_features.to(dense.dtype), dim=-1)
        queries = text
        if self.layers:
            q = self.query_in(text)
            memory = self.memory_in(dense.flatten(2).transpose(1, 2))
            for layer in self.layers:
                q = layer(q, memory)
            # a bounded correction: |tanh(gate)| <= 1 against a unit text vector, so a query
            # keeps its class's text (unbounded, it drifted to cos -0.36 from it in 500 steps)
            queries = text + torch.tanh(self.query_gate) * F.normalize(self.query_out(q), dim=-1)
        queries = F.normalize(queries, dim=-1)
        bg = F.normalize(self.background, dim=0).to(queries.dtype).view(1, 1, -1).expand(b, 1, -1)
        table = torch.cat([bg, queries], dim=1)
        logits = torch.einsum("behw,bke->bkhw", dense, table) * self.logit_scale.exp()
        logits = torch.cat([logits[:, :1] + self.bg_bias, logits[:, 1:]], dim=1)
        return logits, queries

    def forward(self, images: torch.Tensor, class_features: torch.Tensor) -> SegmenterOutput:
        """``images`` Bx3xHxW in [0, 1]; ``class_features`` KxT or BxKxT -> SegmenterOutput
        with logits Bx(1+K)xHxW (channel 0 = background)."""
        padded, h, w = self._pad(images)
        b = images.shape[0]
        if class_features.dim() == 2:
            class_features = class_features.unsqueeze(0).expand(b, -1, -1)
        glob, dense = self.encode(padded)
        return self._output(glob, dense, class_features, padded.shape[-2:], h, w)

    def _output(self, glob, dense, class_features, size, h, w) -> SegmenterOutput:
        logits, queries = self.decode(dense, class_features)
        # channels-last: the CPU's bilinear upsampling (and its backward) is about 3x faster on
        # it than on NCHW for these many-channel, small-grid logits
        logits = logits.float().contiguous(memory_format=torch.channels_last)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return SegmenterOutput(
            logits[..., :h, :w], glob.float(), dense.mean(dim=(2, 3)).float(), queries.float()
        )

    def compute_loss(self, batch, params) -> tuple[torch.Tensor, dict[str, float]]:
        return minizeg_loss(self, batch, params)


def minizeg_loss(model: MiniZegSegmenter, batch, params) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a :class:`magicseg.model.base.Batch` = pixel loss + ``cf_weight`` x the
    counterfactual loss (``train.cf_loss``, see the module docstring). Positives and the
    counterfactuals of ``batch.cf_rows`` pass the prompted tower as one batch."""
    use_cf = params.cf_weight > 0
    kind = params.cf_loss
    b = batch.images.shape[0]
    rows = batch.cf_rows.to(batch.images.device)
    cf_images, cf_features = batch.counterfactuals()
    images = torch.cat([batch.images, cf_images]) if use_cf else batch.images
    padded, h, w = model._pad(images)
    glob, dense = model.encode(padded)
    cf_loss = batch.images.new_zeros((), dtype=torch.float32)
    if use_cf and kind == "cf_background":
        feats = torch.cat([batch.features, cf_features])
        out = model._output(glob, dense, feats, padded.shape[-2:], h, w)
        logits = out.logits[:b]
        empty = torch.zeros_like(batch.target[rows])
        cf_loss = pixel_loss(out.logits[b:], empty, 1.0)
    else:
        out = model._output(glob[:b], dense[:b], batch.features, padded.shape[-2:], h, w)
        logits = out.logits
        if use_cf:
            g = glob.float()
            cf_loss = embedding_cf_loss(
                kind,
                g[:b][rows],
                g[b:],
                out.pixel_mean[rows],
                lambda: dense[b:].mean(dim=(2, 3)).float(),
                out.class_embeddings[rows],
                batch.own[rows],
                params.cf_margin,
            )
    pix = pixel_loss(logits, batch.target, params.bg_weight)
    total = pix + params.cf_weight * cf_loss
    return total, parts(total, pix, cf_loss)
