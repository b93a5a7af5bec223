"""The segmenter and text-encoder protocols and the segmenter's output.

Every model the training loop can train (``offline``, ``clip``) is an ``nn.Module`` that scores
per-pixel embeddings against class (text) embeddings, also returns a global image embedding for
the counterfactual loss, and owns its training loss (``compute_loss(batch, params)`` of a
:class:`Batch`). Text encoders turn class names into frozen feature vectors that the segmenter
projects into its own embedding space.
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
class Batch:
    """One training batch, what a model's ``compute_loss`` takes (one process's slice of the
    global batch in a distributed run).

    - ``images``/``cf_images``: Bx3xHxW float in [0, 1], positives and their counterfactuals;
    - ``features``: BxKxT text features of the classes sampled for each image;
    - ``target``: BxHxW int64 in the sampled index space (0 = background, ``j + 1`` = the
      ``j``-th sampled class, :data:`magicseg.model.losses.IGNORE` = not scored);
    - ``own``: BxK bool, True where the sampled class is one of the image's own;
    - ``cf_rows``: B bool, the images whose counterfactual is passed and scored
      (``train.cf_fraction``; all True by default).
    """

    images: torch.Tensor
    cf_images: torch.Tensor
    features: torch.Tensor
    target: torch.Tensor
    own: torch.Tensor
    cf_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.cf_rows is None:
            self.cf_rows = torch.ones(self.images.shape[0], dtype=torch.bool)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))

    def counterfactuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Mx3xHxW counterfactual images, MxKxT their classes' features) of the ``cf_rows``."""
        rows = self.cf_rows.to(self.images.device)
        return self.cf_images[rows], self.features[rows]


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

    ``compute_loss(batch, params)``: a :class:`Batch` and the ``train`` params -> (scalar loss
    tensor, {"loss", "pixel_loss", "cf_loss"} floats); process-count independent (a batch's
    loss is the mean over the processes of their slices' losses).
    """

    text_dim: int

    def __call__(self, images: torch.Tensor, class_features: torch.Tensor) -> SegmenterOutput: ...

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    """Frozen class-name encoder: ``encode(names) -> Tensor`` of shape ``len(names) x dim``
    (float32, CPU, L2-normalised). Implementations cache per name.

    The encoder owns the prompt templates: ``names`` are bare class names, filled into its own
    ``templates`` (the clip encoder: its training templates; ``("{}",)``: the name as is), a
    class's feature the normalised mean over them. ``encode(names, templates)`` uses the given
    templates *instead of* its own for that call (evaluation's ``evaluate.templates``), so a
    name is never wrapped twice."""

    name: str
    dim: int
    templates: tuple[str, ...]

    def encode(
        self, names: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor: ...
