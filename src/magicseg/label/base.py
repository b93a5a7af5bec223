"""The labeler protocol and its data types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class LabelInput:
    """One generated pair to label. Images are HWC uint8 RGB; ``oracle_mask`` (HW int,
    vocabulary indices) only where the generator knew the exact object pixels."""

    id: str
    positive: np.ndarray
    counterfactual: np.ndarray
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    oracle_mask: np.ndarray | None = None


@dataclass
class LabelResult:
    """A labeler's answer for one pair.

    ``mask``: HW int64 class indices (0 = background, ``ignore`` value for unsure pixels).
    ``scores``: per class of the sample (aligned with ``class_ids``), detection confidence in
    [0, 1] or None for labelers that do not score. ``cf_detected``: per class, whether it was
    still found in the counterfactual, or None when not checked. ``cf_agreement``: IoU of the
    foreground with the counterfactual-difference foreground, or None. ``detections``: the
    boxes behind the mask, each ``{"class_id": int, "score": float, "box": [x0, y0, x1, y1]}``
    (XYXY pixels), or None for labelers that do not detect (an empty list: nothing detected).
    """

    mask: np.ndarray
    scores: list[float] | None = None
    cf_detected: list[bool] | None = None
    cf_agreement: float | None = None
    detections: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Labeler(Protocol):
    """Turns generated pairs into class-indexed masks."""

    name: str

    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]: ...
