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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from magicseg.model.base import SegmenterOutput


def _conv(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 - BatchNorm - ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
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
            nn.BatchNorm2d(stem),
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
