"""Segmentation metrics from a streaming confusion matrix.

Classes are ``0..C-1`` with 0 = background; pixels whose target is the ignore value are skipped.
IoU of class ``c`` = TP / (TP + FP + FN); a class with no target and no predicted pixel has no
IoU (NaN) and is left out of every mean, so absent classes neither help nor hurt.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class ConfusionMatrix:
    """``C x C`` pixel counts, rows = target class, columns = predicted class.

    ``update(pred, target)`` takes integer arrays/tensors of the same shape (any), values in
    ``0..C-1`` (``target`` may also hold ``ignore``); predictions outside ``0..C-1`` count as
    wrong for the target class and are dropped from the columns.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.missed = np.zeros(num_classes, dtype=np.int64)
        """Target pixels whose prediction fell outside ``0..C-1`` (counted as false negatives)."""

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        pred = _flat(pred)
        target = _flat(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} differ")
        c = self.num_classes
        keep = (target >= 0) & (target < c)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        pred, target = pred[keep], target[keep]
        inside = (pred >= 0) & (pred < c)
        self.matrix += np.bincount(target[inside] * c + pred[inside], minlength=c * c).reshape(c, c)
        self.missed += np.bincount(target[~inside], minlength=c)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix
        self.missed += other.missed

    def iou(self) -> np.ndarray:
        """Per-class IoU, length C, NaN for classes absent from both target and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        fp = self.matrix.sum(0) - tp
        fn = self.matrix.sum(1) - tp + self.missed
        union = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, classes: Iterable[int] | None = None) -> float:
        """Mean IoU over ``classes`` (default: all, background included), NaN classes skipped;
        NaN when none of them has an IoU."""
        iou = self.iou()
        if classes is not None:
            idx = np.asarray(list(classes), dtype=np.int64)
            iou = iou[idx] if idx.size else np.array([np.nan])
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def present(self) -> np.ndarray:
        """Boolean, length C: classes with at least one target pixel."""
        return (self.matrix.sum(1) + self.missed) > 0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum() + self.missed.sum()
        return float(np.diag(self.matrix).sum() / total) if total else float("nan")


def _flat(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(np.int64)
