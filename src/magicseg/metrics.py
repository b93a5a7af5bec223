"""Segmentation metrics from a streaming confusion matrix.

Classes are ``0..C-1`` with 0 = background; pixels whose target is the ignore value are skipped.
IoU of class ``c`` = TP / (TP + FP + FN); a class with no target and no predicted pixel has no
IoU (NaN) and is left out of every mean, so absent classes neither help nor hurt.

Streaming: ``update`` folds each batch into the counts and keeps nothing else. Predictions on a
GPU are counted there (``torch.bincount``) into a device-side buffer that is copied to the host
only when the counts are read; CPU tensors take the numpy path (``np.bincount`` is several
times faster than ``torch.bincount`` on the CPU: ``benchmarks/bench_confusion.py``).
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
        self._matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._missed = np.zeros(num_classes, dtype=np.int64)
        self._pending: torch.Tensor | None = None  # C*C + C counts on a torch device

    @property
    def matrix(self) -> np.ndarray:
        """``C x C`` int64 counts, rows = target, columns = prediction."""
        self._flush()
        return self._matrix

    @property
    def missed(self) -> np.ndarray:
        """Target pixels whose prediction fell outside ``0..C-1`` (counted as false negatives)."""
        self._flush()
        return self._missed

    def _flush(self) -> None:
        if self._pending is not None:
            counts = self._pending.cpu().numpy()
            c = self.num_classes
            self._matrix += counts[: c * c].reshape(c, c)
            self._missed += counts[c * c :]
            self._pending = None

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        if isinstance(pred, torch.Tensor) and pred.device.type != "cpu":
            self._update_torch(pred, torch.as_tensor(target, device=pred.device))
            return
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
        cells = np.bincount(target[inside] * c + pred[inside], minlength=c * c)
        self._matrix += cells.reshape(c, c)
        self._missed += np.bincount(target[~inside], minlength=c)

    def _update_torch(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """The same counts with ``torch.bincount`` on the tensors' device (no host copy)."""
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        c = self.num_classes
        keep = (target >= 0) & (target < c)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        pred, target = pred[keep], target[keep]
        inside = (pred >= 0) & (pred < c)
        # one bincount: cells 0..C*C-1 for (target, pred), C*C + t for a miss of target t
        index = torch.where(inside, target * c + pred, c * c + target)
        counts = torch.bincount(index, minlength=c * c + c)
        self._pending = counts if self._pending is None else self._pending + counts

    def merge(self, other: ConfusionMatrix) -> None:
        self._flush()
        self._matrix += other.matrix
        self._missed += other.missed

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
