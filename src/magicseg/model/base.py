"""The segmenter and text-encoder protocols and the segmenter's output.

Every model the training loop can train (``offline`` here, ``clip`` later) is an ``nn.Module``
that scores per-pixel embeddings against class (text) embeddings and also returns a global image
embedding for the counterfactual loss. Text encoders turn class names into frozen feature vectors
that the segmenter projects into its own embedding space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB arrays (same size) or a BxHxWx3 uint8 array -> Bx3xHxW float in [0, 1],
    the image format every :class:`Segmenter` takes."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected BxHxWx3 uint8 images, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class SegmenterOutput:
    """What a segmenter returns for a batch.

    - ``logits``: Bx(1+K)xHxW float; channel 0 is background, channel ``k`` the ``k``-th class
      embedding that was passed in.
    - ``global_embedding``: BxE float, a projection head on the pooled image-encoder features
      (not normalised): the counterfactual losses ``hinge_head`` and ``text_margin`` use it.
    - ``pixel_mean``: BxE float, the mean over HxW of the pixel embeddings (the literal paper
      form ``hinge_pixels`` uses it).
    - ``class_embeddings``: BxKxE float, the class features projected into the pixel-embedding
      space (L2-normalised), so ``text_margin`` compares like with like.
    """

    logits: torch.Tensor
    global_embedding: torch.Tensor
    pixel_mean: torch.Tensor
    class_embeddings: torch.Tensor


class Segmenter(Protocol):
    """An open-vocabulary segmenter (an ``nn.Module``).

    ``forward(images, class_features)``: ``images`` Bx3xHxW float RGB in [0, 1];
    ``class_features`` KxT (the same classes for every image) or BxKxT (per image), the text
    encoder's features; returns :class:`SegmenterOutput`.

    ``embed_images(images)``: Bx3xHxW -> BxE global embeddings only (the image encoder and the
    projection head, no decoder): the cheap pass for counterfactual images.
    """

    text_dim: int

    def __call__(self, images: torch.Tensor, class_features: torch.Tensor) -> SegmenterOutput: ...

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    """Frozen class-name encoder: ``encode(names) -> Tensor`` of shape ``len(names) x dim``
    (float32, CPU, L2-normalised). Implementations cache per name."""

    name: str
    dim: int

    def encode(self, names: Sequence[str]) -> torch.Tensor: ...
