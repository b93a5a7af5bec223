"""What evaluate reports for every test set (the procedural one and each real dataset): one
summary of a confusion matrix and one per-class CSV.

Means skip classes without an IoU (absent from both labels and predictions, see
:mod:`magicseg.metrics`); a class predicted but never labelled counts with IoU 0.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from magicseg.core.io import atomic_path
from magicseg.core.vocabulary import HOLDOUT_KINDS
from magicseg.metrics import ConfusionMatrix


def _rounded(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def summarise(
    cm: ConfusionMatrix,
    scored: Sequence[int],
    seen: Sequence[int] | None = None,
    heldout: Sequence[int] | None = None,
    heldout_kinds: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """``miou`` over the ``scored`` classes, ``pixel_acc``, ``iou_background``,
    ``classes_scored`` (scored classes with an IoU); with ``seen``/``heldout`` (1-based ids)
    also ``miou_seen``, ``miou_heldout``, ``hiou`` (their harmonic mean) and, for each kind of
    :data:`~magicseg.core.vocabulary.HOLDOUT_KINDS`, ``miou_heldout_<kind>`` over the held-out
    classes of that kind (``heldout_kinds``: kind -> ids, the parts of ``heldout``; see
    :meth:`Vocabulary.holdout_kind`). Floats rounded to 4 places; None where undefined (a kind
    without classes, or none given)."""
    iou = cm.iou()
    out = {
        "miou": cm.miou(scored),
        "pixel_acc": cm.pixel_accuracy(),
        "iou_background": float(iou[0]),
        "classes_scored": int(np.isfinite(iou[list(scored)]).sum()),
    }
    if seen is not None and heldout is not None:
        a, b = cm.miou(seen), cm.miou(heldout)
        out |= {"miou_seen": a, "miou_heldout": b}
        for kind in HOLDOUT_KINDS:
            out[f"miou_heldout_{kind}"] = cm.miou(list((heldout_kinds or {}).get(kind, ())))
        both = np.isfinite(a) and np.isfinite(b) and a + b > 0
        out["hiou"] = 2 * a * b / (a + b) if both else None
    return {k: v if isinstance(v, int) else _rounded(v) for k, v in out.items()}


def write_per_class(
    path: str | Path,
    cm: ConfusionMatrix,
    names: Sequence[str],
    scored: Sequence[int],
    heldout: Collection[int] | None = None,
    holdout_kind: Mapping[int, str] | None = None,
) -> None:
    """CSV rows ``class, iou, pixels`` (a DVC bar plot) for every ``scored`` class that has an
    IoU, background (0) named ``background``; with ``heldout`` also ``split`` (background,
    seen or heldout); with ``holdout_kind`` (held-out id -> ``combination`` or ``novel``) also
    ``holdout_kind`` (empty for background and seen classes). ``pixels``: labelled pixels of
    the class."""
    iou = cm.iou()
    pixels = cm.matrix.sum(1) + cm.missed
    labels = ["background", *names]
    header = ["class", "iou", "pixels"] + (["split"] if heldout is not None else [])
    header += ["holdout_kind"] if holdout_kind is not None else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for c in scored:
            if not np.isfinite(iou[c]):
                continue
            row = [labels[c], round(float(iou[c]), 4), int(pixels[c])]
            if heldout is not None:
                row.append("background" if c == 0 else "heldout" if c in heldout else "seen")
            if holdout_kind is not None:
                row.append(holdout_kind.get(c, ""))
            w.writerow(row)
