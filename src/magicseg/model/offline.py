"""The offline segmenter: a small U-Net image encoder trained from scratch, scored against frozen
text features projected by an MLP (config: :class:`magicseg.core.config.OfflineModelParams`).

Shapes (``w`` = width, ``d`` = depth, ``E`` = embed_dim, ``T`` = text_dim):

    images Bx3xHxW in [0, 1]
      -> stem: conv3x3 stride 2 (w/2 channels): everything below runs at H/2 x W/2 (CPU cost)
      -> encoder levels i = 0..d-1: two conv3x3-BN-ReLU with w*2^i channels, 2x max-pool between
      -> decoder: 2x upsample, concat the skip, one conv3x3-BN-ReLU per level, back to H/2
      -> 1x1 conv: pixel embeddings BxExH/2xW/2
    class features KxT or BxKxT -> MLP (T -> 2E -> E) -> L2-normalised class embeddings
    background: one learnable E-vector (+ a learned bias on its logit)
    logits = exp(logit_scale) * cosine(pixel, [background, classes]), bilinearly upsampled to HxW
    global embedding (counterfactual losses): MLP head on the mean-pooled deepest features

Any H, W works: inputs are padded to a multiple of ``2^d`` and the logits cropped back.

Normalisation: :class:`GlobalBatchNorm2d`, BatchNorm whose training statistics span every
process of a distributed run, so N processes train the model one process trains.

Loss (:meth:`OfflineSegmenter.compute_loss`, :func:`offline_loss`): weighted cross-entropy over
(background + sampled classes) plus ``train.cf_weight`` x the counterfactual loss
(``train.cf_loss``, see :func:`offline_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from magicseg.core.errors import ConfigError
from magicseg.model.base import Batch, SegmenterOutput
from magicseg.model.losses import hinge_cos, parts, pixel_loss, text_margin, world_size


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the whole batch of every
    process of a distributed run (gloo or NCCL, CPU or GPU: torch's SyncBatchNorm refuses CPU
    tensors). The per-channel sums go through autograd-aware all-reduces, so gradients flow
    through the shared statistics as in one process. In one process, or in eval mode, it is
    ``nn.BatchNorm2d`` itself (same kernels, same bytes); same state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # 1. Global mean, then global (biased) variance around it: two all-reduces of C + 1.
        c = x.shape[1]
        xf = x.float()
        n = xf.new_tensor([xf.numel() / c])
        tot = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), n]))
        count = tot[c]
        mean = tot[:c] / count
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        # 2. Running statistics, as nn.BatchNorm2d keeps them (unbiased variance).
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / int(self.num_batches_tracked)
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * unbiased)
        # 3. Normalise and scale.
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def _conv(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 - BatchNorm - ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        GlobalBatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two conv3x3 - BatchNorm - ReLU."""
    return nn.Sequential(_conv(cin, cout), _conv(cout, cout))


class OfflineSegmenter(nn.Module):
    """U-Net pixel embeddings x projected text features (see the module docstring)."""

    def __init__(self, width: int, depth: int, embed_dim: int, text_dim: int) -> None:
        super().__init__()
        self.depth = depth
        self.text_dim = text_dim
        chans = [width * 2**i for i in range(depth)]
        stem = max(width // 2, 4)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            GlobalBatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.down = nn.ModuleList(
            _block(cin, cout) for cin, cout in zip([stem, *chans[:-1]], chans, strict=True)
        )
        self.up = nn.ModuleList(
            _conv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth - 1))
        )
        self.pixel_head = nn.Conv2d(chans[0], embed_dim, 1)
        self.text_proj = nn.Sequential(
            nn.Linear(text_dim, 2 * embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        self.global_head = nn.Sequential(
            nn.Linear(chans[-1], 2 * embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        self.background = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bg_bias = nn.Parameter(torch.zeros(()))
        self.register_buffer(
            "mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False
        )

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Bx3xHxW -> the encoder's feature maps, finest first."""
        x = self.stem((images - self.mean) / self.std)
        feats = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        return feats

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = images.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), mode="replicate")
        return images, h, w

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW -> BxE global embeddings (encoder + projection head only)."""
        images, _, _ = self._pad(images)
        return self.global_head(self._encode(images)[-1].mean(dim=(2, 3)))

    def project_text(self, class_features: torch.Tensor) -> torch.Tensor:
        """...xT text features -> ...xE L2-normalised class embeddings."""
        return F.normalize(self.text_proj(class_features), dim=-1)

    def forward(self, images: torch.Tensor, class_features: torch.Tensor) -> SegmenterOutput:
        """``images`` Bx3xHxW in [0, 1]; ``class_features`` KxT or BxKxT -> SegmenterOutput
        with logits Bx(1+K)xHxW (channel 0 = background)."""
        images, h, w = self._pad(images)
        b = images.shape[0]

        # 1. Image encoder and U-Net decoder -> pixel embeddings.
        feats = self._encode(images)
        x = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        pixels = self.pixel_head(x)
        pixel_mean = pixels.mean(dim=(2, 3))

        # 2. Class embeddings (per image), background first.
        if class_features.dim() == 2:
            class_features = class_features.unsqueeze(0).expand(b, -1, -1)
        classes = self.project_text(class_features)
        bg = F.normalize(self.background, dim=0).view(1, 1, -1).expand(b, 1, -1)
        table = torch.cat([bg, classes], dim=1)

        # 3. Cosine logits with a learned temperature; a bias on background only. Dividing the
        #    (1+K)-channel scores by the pixel norms is cheaper than normalising E channels.
        norm = pixels.norm(dim=1, keepdim=True).clamp_min(1e-6)
        logits = torch.einsum("behw,bke->bkhw", pixels, table) / norm * self.logit_scale.exp()
        logits = torch.cat([logits[:, :1] + self.bg_bias, logits[:, 1:]], dim=1)
        logits = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
        logits = logits[..., :h, :w]
        glob = self.global_head(feats[-1].mean(dim=(2, 3)))
        return SegmenterOutput(logits, glob, pixel_mean, classes)

    def compute_loss(self, batch: Batch, params) -> tuple[torch.Tensor, dict[str, float]]:
        return offline_loss(self, batch, params)


def offline_loss(
    model: OfflineSegmenter, batch: Batch, params
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a :class:`Batch` = pixel loss + ``cf_weight`` x counterfactual loss, and
    the parts as floats. ``params``: the ``train`` params (``cf_loss``, ``cf_weight``,
    ``cf_margin``, ``bg_weight``). The counterfactuals of ``batch.cf_rows`` pass:

    - ``hinge_head``: through the encoder and the global head: mean max(0, cos(g_pos, g_cf));
    - ``hinge_pixels``: through the whole model with the positives (one batch): the same on
      the mean pixel embeddings (the literal form; it fights the pixel objective);
    - ``cf_background``: through the whole model with the positives, supervised as background
      against the positive's sampled classes ("the class is not here");
    - ``text_margin``: through the encoder: max(0, m - cos(g_pos, t) + cos(g_cf, t)) for each
      own class embedding t.
    """
    kind = params.cf_loss
    use_cf = params.cf_weight > 0
    b = batch.images.shape[0]
    cf_loss = batch.images.new_zeros((), dtype=torch.float32)
    cf_images, cf_features = batch.counterfactuals() if use_cf else (None, None)
    rows = batch.cf_rows.to(batch.images.device)
    if use_cf and kind in ("hinge_pixels", "cf_background"):
        # 1. Positives and counterfactuals through the whole model in one batch.
        out = model(torch.cat([batch.images, cf_images]), torch.cat([batch.features, cf_features]))
        logits = out.logits[:b]
        if kind == "hinge_pixels":
            cf_loss = hinge_cos(out.pixel_mean[:b][rows], out.pixel_mean[b:])
        else:
            empty = torch.zeros(out.logits[b:].shape[:1] + batch.target.shape[1:], dtype=torch.long)
            cf_loss = pixel_loss(out.logits[b:], empty.to(logits.device), 1.0)
    else:
        # 1. Positives through the whole model, counterfactuals through the encoder only.
        out = model(batch.images, batch.features)
        logits = out.logits
        if use_cf:
            g_cf = model.embed_images(cf_images)
            if kind == "hinge_head":
                cf_loss = hinge_cos(out.global_embedding[rows], g_cf)
            elif kind == "text_margin":
                cf_loss = text_margin(
                    out.global_embedding[rows],
                    g_cf,
                    out.class_embeddings[rows],
                    batch.own[rows],
                    params.cf_margin,
                )
            else:
                raise ConfigError(f"train.cf_loss: unknown {kind!r}")
    # 2. The pixel loss and the total.
    pix = pixel_loss(logits, batch.target, params.bg_weight)
    total = pix + params.cf_weight * cf_loss
    return total, parts(total, pix, cf_loss)
