"""Inference with a loaded checkpoint: images + class names in, class-index masks out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from magicseg.errors import DataError
from magicseg.model import Checkpoint


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB arrays (same size) or a BxHxWx3 uint8 array -> Bx3xHxW float in [0, 1]."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected BxHxWx3 uint8 images, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


class Predictor:
    """Scores every pixel against a set of class names.

    ``predict(images)`` returns Bx(1+K)xHxW logits for the classes set with ``set_classes``;
    ``segment(images)`` the argmax, an HW int64 mask per image (0 = background, ``k`` = the
    ``k``-th name). Images of another size than the checkpoint's training size are resized to
    it and the logits resized back (bilinear). ``bg_threshold``: a pixel whose highest class
    probability is below it is background.
    """

    def __init__(
        self, checkpoint: Checkpoint, device: str = "cpu", bg_threshold: float | None = None
    ) -> None:
        self.ckpt = checkpoint
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.bg_threshold = bg_threshold
        self.names: list[str] = []
        self._features: torch.Tensor | None = None

    def set_classes(self, names: Sequence[str]) -> None:
        """Encode the class names once (KxT text features)."""
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise DataError("no class names given")
        self.names = names
        self._features = self.ckpt.text_encoder.encode(names).to(self.device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW float in [0, 1] -> Bx(1+K)xHxW float logits (CPU)."""
        if self._features is None:
            raise DataError("set_classes() first")
        h, w = images.shape[-2:]
        x = images.to(self.device)
        th, tw = self.ckpt.image_size
        if (h, w) != (th, tw):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
        logits = self.model(x, self._features).logits
        if (h, w) != (th, tw):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.float().cpu()

    def segment(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Bx3xHxW float in [0, 1] -> BxHxW int64 class indices (0 = background)."""
        out = []
        for start in range(0, images.shape[0], batch_size):
            logits = self.predict(images[start : start + batch_size])
            labels = logits.argmax(1)
            if self.bg_threshold is not None:
                probs = logits.softmax(1)
                fg_best = probs[:, 1:].max(1)
                labels = torch.where(fg_best.values >= self.bg_threshold, fg_best.indices + 1, 0)
            out.append(labels)
        return torch.cat(out)
