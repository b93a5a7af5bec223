"""The paper's segmenter: a frozen CLIP ViT with deep visual prompts and a class-query decoder
(config: :class:`magicseg.core.config.ClipModelParams`, ``train.architecture: clip``). Two decoders, chosen
by ``train.clip.decoder``: ``query`` (below) and ``atm``, the published ZegCLIP ATM decoder
(:mod:`magicseg.model.atm`), both behind the same :class:`ClipSegmenter`.

Shapes (``P`` = prompt tokens, ``N = h*w`` patches, ``C`` = vision width, ``D`` = decoder_dim,
``T`` = text dim = the CLIP joint dim, ``K`` = classes scored):

    images Bx3xHxW in [0, 1] -> CLIP normalisation -> patch embeddings + (interpolated) positions
      -> pre-LN -> for each of the L frozen layers: [CLS, prompts_l (P learnable), patches]
         (deep VPT: layer l's prompt outputs are dropped and replaced by prompts_{l+1};
         ``vpt_style: zegclip`` adds the published extras, see :class:`PromptedViT`)
      -> CLS (post-LN + visual projection): BxT global embedding, the CLIP image embedding
      -> patches (post-LN) -> Linear C->D: BxNxD pixel features
         (atm: visual projection + L2 norm instead, D = T)
    class features BxKxT (the frozen CLIP text encoder) -> Linear T->D queries, a learnable
      background query first: Bx(1+K)xD
    decoder (``decoder_layers`` x pre-LN transformer decoder layer, ``decoder_heads`` heads):
      queries self-attend, cross-attend to the pixel features; after every layer
      mask logits = <MLP(LN(q)), pixel> / sqrt(D): Bx(1+K)xhxw (deep supervision)
    logits (last layer) bilinearly upsampled to HxW; channel 0 = background.

Loss (:meth:`ClipSegmenter.compute_loss`, called by the training loop): on every decoder layer
(``deep_supervision``; else the last), ``focal_weight`` x sigmoid focal + ``dice_weight`` x dice
over the (1+K) one-hot channels at 1/``loss_stride`` (atm: the published SegLossPlus over the K
class masks, :func:`magicseg.model.atm.seg_loss_plus`), ignore pixels skipped; plus
``train.cf_weight`` x the counterfactual loss, the counterfactual passed through the same ViT in
the same batch (see :func:`clip_loss`). Only the prompt tokens of the vision tower (and, with
``vpt_style: zegclip``, their projection and the final LayerNorm) train; the rest of CLIP is
frozen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from magicseg.core.devices import resolve_device
from magicseg.core.errors import BackendError, ConfigError
from magicseg.core.templates import ZEGCLIP_TEMPLATES
from magicseg.model.base import SegmenterOutput
from magicseg.model.losses import embedding_cf_loss, parts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""``image_norm: imagenet``: the published mmseg ``img_norm_cfg`` (123.675/255, ... ), which
the published code applies to CLIP in place of CLIP's own statistics."""
LOSS_STRIDE = 4
"""Default ``train.clip.loss_stride``: the segmentation loss at 1/4 of the input resolution
(memory with K = 100)."""
VPT_DROPOUT = 0.1
"""Dropout on the projected prompts of ``vpt_style: zegclip`` (the published backbone's)."""


CHECKPOINT_KEY = "train.clip.checkpoint"
"""The params key named in the errors of a CLIP source that cannot be loaded."""


def check_source(source: str) -> str:
    """:func:`magicseg.hub.check_model_source` for a CLIP/SigLIP ``source`` before anything is
    loaded: a one-line BackendError naming ``train.clip.checkpoint`` when the directory is
    missing, the id is not cached offline or the hub does not answer."""
    from magicseg.hub import check_model_source

    return check_model_source(source, CHECKPOINT_KEY)


def _load(cls, source: str, key: str, **kwargs):
    """``cls.from_pretrained(source)`` with a one-line BackendError naming ``key``."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the report lists the other tower's keys as unexpected
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise BackendError(f"{key}: cannot load {source!r} ({str(err).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(level)


def load_vision_tower(source: str) -> tuple[nn.Module, nn.Module | None]:
    """(vision transformer, visual projection or None) of a CLIP or SigLIP checkpoint (hub id
    or directory). SigLIP has no CLS token and no projection: see :class:`PromptedViT`."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_source(source)
    cfg = _load(AutoConfig, source, "train.clip.checkpoint")
    if cfg.model_type in ("clip", "clip_vision_model"):
        kw = {}
        if cfg.model_type == "clip":  # the joint dim lives on the outer config
            kw["config"] = cfg.vision_config
            kw["config"].projection_dim = cfg.projection_dim
        model = _load(CLIPVisionModelWithProjection, source, "train.clip.checkpoint", **kw)
        return model.vision_model, model.visual_projection
    model = _load(AutoModel, source, "train.clip.checkpoint")
    vision = getattr(model, "vision_model", model)
    return vision, getattr(model, "visual_projection", None)


class PromptedViT(nn.Module):
    """A frozen CLIP/SigLIP vision transformer with deep visual prompt tuning (VPT-deep).

    ``forward(images)`` (Bx3xHxW in [0, 1], H and W multiples of the patch size) returns
    (BxT global embedding, BxCxhxw patch features of the last layer). The global embedding is
    the post-LN CLS token through the visual projection (CLIP); for towers without a CLS token
    (SigLIP) the tower's attention-pooling head on the post-LN patch tokens (else their mean).

    Every layer gets its own ``vpt_tokens`` prompts, inserted after the CLS token (layer 0:
    after the pre-LN; later layers: replacing the previous layer's prompt outputs), as in the
    published backbone (``total_d_layer: 11``: the input prompts + 11 deep sets for 12 layers).
    ``style: zegclip`` reproduces the rest of the published ``VPTCLIPVisionTransformer``:

    - every layer's prompts pass through one shared trainable Linear (Kaiming-normal weight,
      fan-out), are expanded over the batch and then pass dropout 0.1 (one mask per image)
      before insertion;
    - a trainable LayerNorm (eps 1e-6) on all tokens of the last layer, before the post-LN;
    - positions: the pretrained grid bilinearly resized to ``resolution / patch`` (the
      published ``input_resolution``, here ``train.clip.resolution``), then to the image's grid
      (HF: bicubic, directly);
    - the CLS token's input is class embedding + position 0 + class embedding (the published
      code adds the class embedding twice; kept as written).

    ``image_norm``: ``model`` normalises the [0, 1] input with the tower's own statistics,
    ``imagenet`` with ImageNet's (the published ``img_norm_cfg``).

    The published ``drop_path_rate: 0.1`` is not reproduced: its blocks build DropPath modules
    that their forward never calls (the published ``models/backbone/utils.py``), so the
    published backbone has no stochastic depth either.
    """

    def __init__(
        self,
        source: str,
        vpt_tokens: int,
        style: str = "plain",
        resolution: int | None = None,
        image_norm: str = "model",
    ) -> None:
        super().__init__()
        vision, projection = load_vision_tower(source)
        self.vision = vision
        self.projection = projection
        for p in self.parameters():
            p.requires_grad_(False)
        emb = vision.embeddings
        self.has_cls = hasattr(emb, "class_embedding")
        self.patch = int(vision.config.patch_size)
        self.width = int(vision.config.hidden_size)
        self.out_dim = int(projection.out_features) if projection is not None else self.width
        layers = vision.encoder.layers
        self.vpt_tokens = vpt_tokens
        # VPT init: uniform(-v, v), v = sqrt(6 / (3 * patch^2 + C)) (Jia et al. 2022)
        v = math.sqrt(6.0 / (3 * self.patch**2 + self.width))
        self.prompts = nn.Parameter(
            torch.empty(len(layers), vpt_tokens, self.width).uniform_(-v, v)
        )
        mean, std = CLIP_MEAN, CLIP_STD
        if not self.has_cls:  # SigLIP normalises to [-1, 1]
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if image_norm == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif image_norm != "model":
            raise ConfigError(
                f"train.clip.image_norm: unknown {image_norm!r} (allowed: model, imagenet)"
            )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.style = style
        if style == "zegclip":
            if not self.has_cls:
                raise ConfigError(
                    "train.clip.vpt_style: zegclip needs a CLIP vision tower (with a CLS token)"
                )
            self.resolution = int(resolution or vision.config.image_size)
            self.prompt_proj = nn.Linear(self.width, self.width)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
            self.prompt_dropout = nn.Dropout(VPT_DROPOUT)
            self.prompt_norm = nn.LayerNorm(self.width, eps=1e-6)
        elif style != "plain":
            raise ConfigError(f"train.clip.vpt_style: unknown {style!r} (allowed: plain, zegclip)")

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.vision.eval()  # frozen: no dropout
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        if h % self.patch or w % self.patch:
            raise ConfigError(f"clip: image {h}x{w} is not a multiple of the patch {self.patch}")
        x = (images - self.mean) / self.std
        # 1. Embeddings with position embeddings interpolated to this size.
        if self.style == "zegclip":
            x = self._zegclip_embeddings(x)
        else:
            x = self.vision.embeddings(x, interpolate_pos_encoding=True)
        pre = getattr(self.vision, "pre_layrnorm", None)
        if pre is not None:
            x = pre(x)
        lead = 1 if self.has_cls else 0
        p = self.vpt_tokens
        # 2. Frozen layers, fresh prompts at each (deep VPT).
        for i, layer in enumerate(self.vision.encoder.layers):
            prompts = self._prompts(i, b, x.dtype)
            if i == 0:
                x = torch.cat([x[:, :lead], prompts, x[:, lead:]], dim=1)
            else:
                x = torch.cat([x[:, :lead], prompts, x[:, lead + p :]], dim=1)
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        if self.style == "zegclip":
            x = self.prompt_norm(x)
        # 3. Global embedding and patch features.
        post = getattr(self.vision, "post_layernorm", None) or nn.Identity()
        patches = post(x[:, lead + p :])
        if self.has_cls:
            glob = post(x[:, 0])
        elif getattr(self.vision, "head", None) is not None:  # SigLIP attention pooling
            glob = self.vision.head(patches)
        else:
            glob = patches.mean(1)
        if self.projection is not None:
            glob = self.projection(glob)
        grid = patches.transpose(1, 2).reshape(b, self.width, h // self.patch, w // self.patch)
        return glob, grid

    def _prompts(self, i: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Layer ``i``'s BxPxC prompt tokens (zegclip: projected, expanded over the batch and
        then dropped out, one dropout mask per image, as the published encoder does)."""
        prompts = self.prompts[i].unsqueeze(0)
        if self.style == "zegclip":
            prompts = self.prompt_dropout(self.prompt_proj(prompts).expand(b, -1, -1))
            return prompts.to(dtype)
        return prompts.expand(b, -1, -1).to(dtype)

    def _zegclip_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised Bx3xHxW -> Bx(1+N)xC token embeddings as the published backbone makes
        them (see the class docstring): bilinear positions, the class embedding twice."""
        emb = self.vision.embeddings
        patches = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype))  # BxCxhxw
        b, c, gh, gw = patches.shape
        pos = emb.position_embedding.weight  # (1 + g*g)xC
        g = math.isqrt(pos.shape[0] - 1)
        s = self.resolution // self.patch
        spatial = pos[1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        for size in ((s, s), (gh, gw)):  # at load, then in the forward (published)
            if tuple(spatial.shape[-2:]) != size:
                spatial = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        tokens = patches.flatten(2).transpose(1, 2) + spatial.flatten(2).transpose(1, 2)
        cls = emb.class_embedding + pos[0] + emb.class_embedding
        return torch.cat([cls.to(tokens.dtype).view(1, 1, c).expand(b, 1, c), tokens], dim=1)


class ClipSegmenter(nn.Module):
    """Prompted frozen CLIP ViT + a class-query decoder (see the module docstring).

    ``decoder``: ``query`` (this project's) or ``atm`` (the published ZegCLIP decoder,
    :class:`magicseg.model.atm.ATMDecoder`; ``decoder_dim`` must equal ``text_dim`` and the
    vision tower's joint dim). Both return :class:`SegmenterOutput` logits Bx(1+K)xHxW with
    channel 0 = background. For ``atm`` the class channels are the sigmoid mask logits and the
    background channel is the constant 0, the sigmoid's decision boundary: the argmax picks the
    best class where its mask fires (p > 0.5) and background where none does; the argmax over
    the class channels alone is the published prediction.
    """

    def __init__(
        self,
        source: str,
        vpt_tokens: int,
        decoder_layers: int,
        decoder_heads: int,
        decoder_dim: int,
        text_dim: int,
        focal_weight: float = 100.0,
        dice_weight: float = 1.0,
        decoder: str = "query",
        vpt_style: str = "plain",
        image_norm: str = "model",
        resolution: int | None = None,
        deep_supervision: bool = True,
        loss_stride: int = LOSS_STRIDE,
    ) -> None:
        super().__init__()
        # 1. Checks that need no weights.
        if decoder_dim % decoder_heads:
            raise ConfigError(
                f"train.clip.decoder_dim: {decoder_dim} is not divisible by "
                f"decoder_heads {decoder_heads}"
            )
        if decoder not in ("query", "atm"):
            raise ConfigError(f"train.clip.decoder: unknown {decoder!r} (allowed: query, atm)")
        if decoder == "atm" and decoder_dim != text_dim:
            raise ConfigError(
                f"train.clip.decoder_dim: the atm decoder works in CLIP's joint space "
                f"(use_proj=False): set it to the text dim {text_dim} (got {decoder_dim})"
            )
        self.text_dim = text_dim
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.decoder = decoder
        self.deep_supervision = deep_supervision
        self.loss_stride = loss_stride
        # 2. The prompted vision tower.
        self.encoder = PromptedViT(source, vpt_tokens, vpt_style, resolution, image_norm)
        d = decoder_dim
        # 3. The decoder.
        if decoder == "atm":
            from magicseg.model.atm import ATMDecoder

            if self.encoder.out_dim != text_dim:
                raise ConfigError(
                    f"train.clip.decoder: atm scores CLIP's image embeddings against the text: "
                    f"the vision tower gives {self.encoder.out_dim}-d, the text {text_dim}-d"
                )
            self.atm = ATMDecoder(d, decoder_heads, decoder_layers)
            return
        self.pixel_proj = nn.Sequential(nn.Linear(self.encoder.width, d), nn.LayerNorm(d))
        self.text_proj = nn.Linear(text_dim, d)
        self.background = nn.Parameter(torch.randn(d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d, decoder_heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(decoder_layers)
        )
        self.mask_norm = nn.LayerNorm(d)
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def param_groups(self) -> list[dict]:
        """Trainable parameters for the optimiser (all get the lr multiplier in the paper)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW -> BxT global (CLS) embeddings, in CLIP's joint space."""
        return self.encoder(self._pad(images)[0])[0]

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = images.shape[-2:]
        m = self.encoder.patch
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), mode="replicate")
        return images, h, w

    def pixel_features(self, grid: torch.Tensor) -> torch.Tensor:
        """BxCxhxw patch features -> BxNxD decoder memory (query: Linear + LN; atm: CLIP's
        visual projection, L2-normalised)."""
        tokens = grid.flatten(2).transpose(1, 2)
        if self.decoder == "atm":
            proj = self.encoder.projection
            return F.normalize(proj(tokens) if proj is not None else tokens, dim=-1)
        return self.pixel_proj(tokens)

    def decode(
        self,
        grid: torch.Tensor,
        class_features: torch.Tensor,
        glob: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """BxCxhxw patch features, BxKxT class features (and BxT global embeddings, which the
        atm decoder needs) -> (per-layer Bx(1+K)xhxw logits, BxD mean pixel feature, BxKxT
        L2-normalised class features)."""
        b, _, gh, gw = grid.shape
        pixels = self.pixel_features(grid)  # BxNxD
        d = pixels.shape[-1]
        if self.decoder == "atm":
            if glob is None:
                raise ValueError("the atm decoder needs the global (CLS) embeddings")
            text = F.normalize(class_features.to(pixels.dtype), dim=-1)
            masks = self.atm(pixels, F.normalize(glob, dim=-1), text, (gh, gw))
            background = masks[-1].new_zeros(b, 1, gh, gw)
            logits = [torch.cat([background, m], dim=1) for m in masks]
        else:
            q = self.text_proj(class_features.to(pixels.dtype))
            q = torch.cat([self.background.to(q.dtype).view(1, 1, d).expand(b, 1, d), q], dim=1)
            logits = []
            for layer in self.layers:
                q = layer(q, pixels)
                m = self.mask_embed(self.mask_norm(q))
                logit = torch.einsum("bkd,bnd->bkn", m, pixels) / math.sqrt(d)
                logits.append(logit.reshape(b, -1, gh, gw))
        return logits, pixels.mean(1), F.normalize(class_features.float(), dim=-1)

    def forward(self, images: torch.Tensor, class_features: torch.Tensor) -> SegmenterOutput:
        """``images`` Bx3xHxW in [0, 1]; ``class_features`` KxT or BxKxT -> SegmenterOutput
        with logits Bx(1+K)xHxW (channel 0 = background) and ``aux_logits`` (every decoder
        layer's logits at patch resolution, last one included)."""
        padded, h, w = self._pad(images)
        b = images.shape[0]
        if class_features.dim() == 2:
            class_features = class_features.unsqueeze(0).expand(b, -1, -1)
        glob, grid = self.encoder(padded)
        aux, pixel_mean, classes = self.decode(grid, class_features, glob)
        logits = F.interpolate(
            aux[-1].float(), size=padded.shape[-2:], mode="bilinear", align_corners=False
        )[..., :h, :w]
        out = SegmenterOutput(logits, glob.float(), pixel_mean.float(), classes)
        out.aux_logits = aux  # type: ignore[attr-defined]
        return out

    def mask_loss(
        self,
        aux: Sequence[torch.Tensor],
        target: torch.Tensor,
        normaliser: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mask loss of per-layer Bx(1+K)xhxw logits against a BxHxW target (sampled index
        space): summed over the layers (``deep_supervision``) or on the last one. query:
        :func:`focal_dice_loss`; atm: :func:`magicseg.model.atm.seg_loss_plus` on the K class
        channels, its number of masks counted in ``normaliser`` (a BxHxW target) when given."""
        layers = aux if self.deep_supervision else aux[-1:]
        s = self.loss_stride
        if self.decoder == "query":
            return sum(
                focal_dice_loss(a, target, self.focal_weight, self.dice_weight, s) for a in layers
            )
        from magicseg.model.atm import average_over_processes, mask_count, seg_loss_plus

        k = aux[-1].shape[1] - 1
        num = None
        if normaliser is not None:
            size = (max(1, normaliser.shape[-2] // s), max(1, normaliser.shape[-1] // s))
            ref = F.interpolate(normaliser[:, None].float(), size=size, mode="nearest")[:, 0]
            num = average_over_processes(mask_count(ref.long(), k))
        return sum(
            seg_loss_plus(a[:, 1:], target, self.focal_weight, self.dice_weight, s, num)
            for a in layers
        )

    def compute_loss(self, batch, params) -> tuple[torch.Tensor, dict[str, float]]:
        return clip_loss(self, batch, params)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def _one_hot(target: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BxHxW target (``IGNORE`` < 0) -> (BxCxHxW float one-hot, BxHxW float valid)."""
    valid = target >= 0
    onehot = F.one_hot(target.clamp_min(0), channels).permute(0, 3, 1, 2).float()
    return onehot * valid.unsqueeze(1), valid.float()


def focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float,
    dice_weight: float,
    stride: int = LOSS_STRIDE,
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> torch.Tensor:
    """``focal_weight`` x sigmoid focal + ``dice_weight`` x dice of Bx(1+K)xhxw logits against
    a BxHxW target in the sampled index space (``IGNORE`` skipped).

    The target is nearest-downsampled to 1/``stride`` and the logits bilinearly resized to
    it. Both terms are per-image means (focal: summed over valid pixels and channels, divided
    by pixels x channels; dice: mean over channels), then a mean over images, so the loss of a
    batch is the mean of its halves' losses (what DDP's gradient averaging needs).
    """
    c = logits.shape[1]
    h, w = target.shape[-2:]
    size = (max(1, h // stride), max(1, w // stride))
    tgt = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()
    x = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    onehot, valid = _one_hot(tgt, c)
    vmask = valid.unsqueeze(1)
    # 1. Sigmoid focal loss (Lin et al.), per element.
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    a_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    focal = (a_t * ce * (1 - p_t) ** gamma * vmask).sum(dim=(1, 2, 3)) / (c * size[0] * size[1])
    # 2. Dice per (image, channel) over valid pixels.
    pv = p * vmask
    inter = (pv * onehot).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (pv.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3)) + 1)
    return (focal_weight * focal + dice_weight * dice.mean(1)).mean()


def clip_loss(model: ClipSegmenter, batch, params) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a :class:`magicseg.model.base.Batch` for the clip model.

    The positive and (when ``cf_weight`` > 0) the counterfactual images of ``batch.cf_rows``
    go through the prompted ViT as one batch. ``train.cf_loss`` maps as:

    - ``hinge_head`` (the paper): mean max(0, cos(CLS_pos, CLS_cf)) of the projected CLS
      embeddings; only the prompt tokens carry its gradient, not the decoder;
    - ``hinge_pixels``: the same on the mean projected patch features;
    - ``cf_background``: the counterfactual decoded against the positive's classes with an
      all-background target (atm: normalised by the positive's number of masks);
    - ``text_margin``: max(0, m - cos(CLS_pos, t) + cos(CLS_cf, t)), t = own class text
      embeddings (CLIP's joint space: needs the CLIP text encoder).
    """
    use_cf = params.cf_weight > 0
    kind = params.cf_loss
    b = batch.images.shape[0]
    rows = batch.cf_rows.to(batch.images.device)
    cf_images, cf_features = batch.counterfactuals()
    images = torch.cat([batch.images, cf_images]) if use_cf else batch.images
    padded, _, _ = model._pad(images)
    glob, grid = model.encoder(padded)
    cf_loss = batch.images.new_zeros((), dtype=torch.float32)
    if use_cf and kind == "cf_background":
        feats = torch.cat([batch.features, cf_features])
        aux, _, _ = model.decode(grid, feats, glob)
        pix = model.mask_loss([a[:b] for a in aux], batch.target)
        empty = torch.zeros_like(batch.target[rows])
        cf_loss = model.mask_loss([a[b:] for a in aux], empty, normaliser=batch.target[rows])
    else:
        aux, pixel_mean, classes = model.decode(grid[:b], batch.features, glob[:b])
        pix = model.mask_loss(aux, batch.target)
        if use_cf:
            glob = glob.float()
            cf_loss = embedding_cf_loss(
                kind,
                glob[:b][rows],
                glob[b:],
                pixel_mean.float()[rows],
                lambda: model.pixel_features(grid[b:]).mean(1).float(),
                classes[rows],
                batch.own[rows],
                params.cf_margin,
            )
    total = pix + params.cf_weight * cf_loss
    return total, parts(total, pix, cf_loss)


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------
class ClipTextEncoder:
    """The frozen CLIP (or SigLIP) text tower: a class embedding = the L2-normalised mean of
    the normalised text embeddings of ``templates`` filled with the name; cached per name, so
    a vocabulary is encoded once. ``dim`` = the joint (projection) dim. The tower runs on
    ``device`` (default: CUDA where available, else the CPU: the 1203 LVIS names x 15 templates
    take about 33 s on a CPU); embeddings are returned on the CPU."""

    def __init__(
        self,
        source: str,
        templates: Sequence[str] = ZEGCLIP_TEMPLATES,
        batch_size: int = 256,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        check_source(source)
        cfg = _load(AutoConfig, source, "train.clip.checkpoint")
        self.name = "clip"
        self.is_clip = cfg.model_type == "clip"
        self.tokenizer = _load(AutoTokenizer, source, "train.clip.checkpoint")
        if self.is_clip:
            text_cfg = cfg.text_config
            text_cfg.projection_dim = cfg.projection_dim  # the joint dim lives on the outer one
            self.model = _load(
                CLIPTextModelWithProjection, source, "train.clip.checkpoint", config=text_cfg
            )
        else:
            self.model = _load(AutoModel, source, "train.clip.checkpoint")
        self.device = resolve_device(None if device is None else str(device), "train.device")
        self.model.eval().requires_grad_(False).to(self.device)
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self.dim = int(self._embed(["x"]).shape[-1])
        self._cache: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Texts -> Nxdim L2-normalised joint-space text embeddings."""
        if self.is_clip:
            batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            out = self.model(**batch.to(self.device)).text_embeds
        else:  # SigLIP was trained on max-length padding
            batch = self.tokenizer(
                texts, padding="max_length", truncation=True, return_tensors="pt"
            )
            out = self.model.get_text_features(**batch.to(self.device))
            out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Bare class names -> ``len(names) x dim`` float32, L2-normalised template-averaged
        embeddings; ``templates`` (each with one ``{}``) replace ``self.templates`` for this
        call (each name is filled into each template once, never into a template twice)."""
        tpls = self.templates if templates is None else tuple(templates)
        todo = [n for n in dict.fromkeys(names) if (tpls, n) not in self._cache]
        t = len(tpls)
        per = max(1, self.batch_size // t)
        for start in range(0, len(todo), per):
            chunk = todo[start : start + per]
            texts = [tpl.format(n) for n in chunk for tpl in tpls]
            emb = self._embed(texts).view(len(chunk), t, -1).mean(1)
            for n, v in zip(chunk, F.normalize(emb, dim=-1), strict=True):
                self._cache[(tpls, n)] = v
        if not names:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[(tpls, n)] for n in names])
