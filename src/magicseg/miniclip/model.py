"""The miniature CLIP's image tower and its checkpoint.

Shapes (``S`` image side, ``C`` = ``width``, ``E`` = the text tower's dim, 384 for MiniLM,
``h = w = S / 4``, ``P`` prompt tokens per layer, none in pretraining):

    images Bx3xSxS in [0, 1] -> (x - 0.5) / 0.25
      -> stem: conv3x3 s2 - GN - GELU, conv3x3 - GN - GELU (stem_width),
               conv3x3 s2 - GN - GELU (2 stem_width), conv3x3 - GN - GELU (C): BxCxhxw
      -> merge: conv2x2 s2 -> tokens Bx(hw/4)xC at stride 8 + learned positions
         (bilinearly resized for another grid)
      -> ``layers`` x pre-LN transformer layer; before each, ``P`` prompt tokens are put in
         front of the patch tokens (layer 0) or replace the previous layer's prompt outputs
         (deep VPT, as :class:`magicseg.model.clip.PromptedViT` does with CLIP)
      -> back to stride 4: nearest 2x upsampling + a 1x1 lateral of the stem features
      -> final LayerNorm per position -> ``proj`` (Linear C->E, no bias): dense BxExhxw
         text-aligned features; their mean over the positions is the global embedding BxE
         (the image embedding scored against captions)

The attention runs at stride 8 (64 tokens for 64 px): at stride 4 it cost five times the
rest of the tower on a CPU.

GroupNorm and LayerNorm only: no statistic is shared between the images of a batch. The global
embedding is the projected mean patch token (no CLS token): the projection is linear, so each
patch's projected feature is scored against the text exactly as the image is, which is what
keeps the dense features text-aligned for segmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = 1
CHECKPOINT = "model.pt"
"""File name of the tower's checkpoint inside the ``pretrained/miniclip`` directory."""
GROUPS = 8


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(GROUPS, cout), cout),
        nn.GELU(),
    ]


@dataclass
class TowerOutput:
    """``glob`` BxE global embedding (not normalised); ``tokens`` BxCxhxw final-LN tokens
    before the projection (:meth:`ImageTower.project` makes them dense BxExhxw features)."""

    glob: torch.Tensor
    tokens: torch.Tensor


class ImageTower(nn.Module):
    """GroupNorm CNN stem + pre-LN transformer layers + a linear projection into the text
    space (see the module docstring). ``config()`` is what rebuilds it."""

    patch = 4

    def __init__(
        self,
        stem_width: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: int,
        embed_dim: int,
        size: int,
    ) -> None:
        super().__init__()
        self._config = {
            "stem_width": stem_width,
            "width": width,
            "layers": layers,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "embed_dim": embed_dim,
            "size": size,
        }
        sw = stem_width
        self.width = width
        self.embed_dim = embed_dim
        self.grid = size // self.patch
        self.stem = nn.Sequential(
            *_conv(3, sw, 2), *_conv(sw, sw), *_conv(sw, 2 * sw, 2), *_conv(2 * sw, width)
        )
        self.merge = nn.Conv2d(width, width, 2, stride=2)
        self.lateral = nn.Conv2d(width, width, 1)
        self.pos = nn.Parameter(torch.randn(1, width, self.grid // 2, self.grid // 2) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                mlp_ratio * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def config(self) -> dict:
        return dict(self._config)

    def stem_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx3xHxW (H, W multiples of 8) -> (BxCxhxw stride-4 stem features, BxNxC stride-8
        tokens with positions, N = hw / 4)."""
        feat = self.stem((images - 0.5) / 0.25)
        x = self.merge(feat)
        pos = self.pos
        if tuple(x.shape[-2:]) != tuple(pos.shape[-2:]):
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return feat, (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> TowerOutput:
        """``images`` Bx3xHxW in [0, 1]; ``prompts`` None or LxPxC (one set per layer) ->
        :class:`TowerOutput`."""
        feat, x = self.stem_tokens(images)
        return self.encode_tokens(feat, x, prompts)

    def encode_tokens(
        self, feat: torch.Tensor, x: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> TowerOutput:
        """The transformer part on the stem's output (so a caller can run the stem alone,
        without gradients): tokens through the layers, back to the stride-4 grid (nearest
        2x upsampling plus a 1x1 lateral of the stem features), final LayerNorm, projection."""
        b, c, h, w = feat.shape
        p = 0 if prompts is None else prompts.shape[-2]
        for i, layer in enumerate(self.layers):
            if p:
                pr = prompts[i].to(x.dtype).expand(b, -1, -1)
                x = torch.cat([pr, x[:, p:] if i else x], dim=1)
            x = layer(x)
        coarse = x[:, p:].transpose(1, 2).reshape(b, c, h // 2, w // 2)
        fine = F.interpolate(coarse, size=(h, w), mode="nearest") + self.lateral(feat)
        tokens = self.norm(fine.flatten(2).transpose(1, 2))
        glob = self.proj(tokens.mean(1))  # = the mean of the projected positions
        return TowerOutput(glob, tokens.transpose(1, 2).reshape(b, c, h, w))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """BxCxhxw final-LN tokens -> BxExhxw dense text-aligned features."""
        return torch.einsum("bchw,ec->behw", tokens, self.proj.weight)


def build_tower(config: dict) -> ImageTower:
    return ImageTower(**config)


def save_tower(path: str | Path, tower: ImageTower, logit_scale: float, meta: dict) -> None:
    """``torch.save`` of {format, config, state_dict, logit_scale, meta}; atomic."""
    from magicseg.core.io import atomic_path

    blob = {
        "format": FORMAT,
        "config": tower.config(),
        "state_dict": {k: v.detach().cpu() for k, v in tower.state_dict().items()},
        "logit_scale": float(logit_scale),
        "meta": meta,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)


def load_tower(path: str | Path) -> tuple[ImageTower, dict]:
    """(the tower in eval mode, the checkpoint dict without the weights); a one-line
    DataError when ``path`` (a file or the ``pretrained/miniclip`` directory) is not one."""
    from magicseg.core.errors import DataError

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise DataError(
            f"{path}: no pretrained miniature CLIP (run `dvc repro pretrain`, or restore "
            "pretrained/miniclip from git)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: not a miniclip checkpoint ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DataError(f"{path}: not a miniclip checkpoint (format {FORMAT})")
    tower = build_tower(blob["config"])
    tower.load_state_dict(blob.pop("state_dict"))
    return tower.eval(), blob
