"""The ``filter`` stage: drop bad samples, each with a reason, and draw a gallery.

Reasons, checked in this order (a sample's ``reason`` is the first that applies; ``reasons``
lists all of them):

- ``unreadable``: the images could not be read, so no mask was made;
- ``no_detection``: a detecting labeler found no box for any class (``box_scores`` empty);
- ``empty_mask``: boxes were found (or the labeler does not detect) but no object pixel;
- ``missing_class``: one of the prompt's classes has no pixel;
- ``area_too_small`` / ``area_too_large``: object area outside [min_area, max_area];
- ``too_many_components``: a class split into more than ``max_components`` pieces;
- ``too_much_ignore``: more than ``max_ignore`` of the pixels are ignore;
- ``low_score``: a class detected with a score below ``min_score`` (scoring labelers);
- ``cf_detected``: a class still detected in the counterfactual (checking labelers);
- ``low_cf_agreement``: the mask disagrees with the counterfactual difference (IoU below
  ``min_cf_agreement``).

``filter.enabled: false`` switches the filter off: every reason is still recorded (the
``reasons`` flags, ``metrics/filter.json: flagged``), but only the samples the labeler made no
mask for are dropped (:data:`MASKLESS`: ``unreadable``, and ``no_detection``, for which the
published flow writes no mask file); every other sample is kept.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from magicseg.core.config import FilterParams
from magicseg.core.errors import DataError
from magicseg.core.io import (
    ignore_index,
    read_image,
    read_manifest,
    read_mask,
    write_json,
    write_manifest,
)
from magicseg.core.seeding import rng
from magicseg.core.vocabulary import Vocabulary
from magicseg.viz import class_legend, overlay, palette, upscale, write_gallery

GALLERY_TILE = 128
"""Gallery images are enlarged (integer factor) to at least this many pixels."""

REASONS = (
    "unreadable",
    "no_detection",
    "empty_mask",
    "missing_class",
    "area_too_small",
    "area_too_large",
    "too_many_components",
    "too_much_ignore",
    "low_score",
    "cf_detected",
    "low_cf_agreement",
)
MASKLESS = ("unreadable", "no_detection")
"""Reasons that mean the sample has no mask to train on: dropped even with the filter off."""


def reasons_for(row: pd.Series | dict, params: FilterParams) -> list[str]:
    """Every reason to drop one label-manifest row (empty list: keep it)."""
    if row["mask"] is None or (isinstance(row["mask"], float) and math.isnan(row["mask"])):
        return ["unreadable"]
    out = []
    areas = list(row["areas"])
    total = float(sum(areas))
    box_scores = row.get("box_scores")
    if box_scores is not None and len(box_scores) == 0:
        out.append("no_detection")
    elif total == 0:
        out.append("empty_mask")
    elif min(areas) == 0:
        out.append("missing_class")
    if 0 < total < params.min_area:
        out.append("area_too_small")
    if total > params.max_area:
        out.append("area_too_large")
    if max(row["components"]) > params.max_components:
        out.append("too_many_components")
    if row["ignore_frac"] > params.max_ignore:
        out.append("too_much_ignore")
    scores = row.get("scores")
    if scores is not None and len(scores) and min(scores) < params.min_score:
        out.append("low_score")
    cf = row.get("cf_detected")
    if params.drop_cf_detected and cf is not None and any(cf):
        out.append("cf_detected")
    agree = row.get("cf_agreement")
    if params.min_cf_agreement > 0 and agree is not None and not math.isnan(agree):
        if agree < params.min_cf_agreement:
            out.append("low_cf_agreement")
    return out


def keeps(reasons: list[str], params: FilterParams) -> bool:
    """Whether a sample with these ``reasons`` (from :func:`reasons_for`) is kept: none of
    them, or the filter is off (``params.enabled``) and the sample has a mask."""
    if params.enabled:
        return not reasons
    return not set(reasons) & set(MASKLESS)


def run_filter(
    label_dir: str | Path,
    out_dir: str | Path,
    params: FilterParams,
    metrics_path: str | Path | None = None,
    gallery_path: str | Path | None = None,
    seed: int = 0,
    vocab: Vocabulary | None = None,
) -> pd.DataFrame:
    """Write the kept samples' ``manifest.parquet`` and every sample's ``decisions.parquet``.

    The kept manifest has the label manifest's columns with paths re-rooted at ``out_dir``.
    ``decisions.parquet``: id, kept, reason (first, None when kept), reasons (all; with the
    filter off, :func:`keeps`, a kept sample's flags). The
    gallery (``gallery_path``) needs the ``vocab`` the masks index (class names, ignore value).
    """
    if gallery_path is not None and vocab is None:
        raise ValueError("run_filter: the gallery needs the vocabulary")
    # 1. Decide.
    label_dir, out_dir = Path(label_dir), Path(out_dir)
    frame = read_manifest(label_dir)
    all_reasons = [reasons_for(row, params) for _, row in frame.iterrows()]
    kept_flags = [keeps(r, params) for r in all_reasons]
    decisions = pd.DataFrame(
        {
            "id": frame["id"],
            "kept": kept_flags,
            "reason": [None if k else r[0] for k, r in zip(kept_flags, all_reasons, strict=True)],
            "reasons": all_reasons,
        }
    )

    # 2. Kept manifest, paths relative to the filter directory.
    rel = os.path.relpath(label_dir, out_dir)
    kept = frame[decisions["kept"].to_numpy()].copy()
    for col in ("image", "cf_image", "mask"):
        kept[col] = [os.path.normpath(f"{rel}/{p}") for p in kept[col]]
    write_manifest(out_dir, kept)
    write_manifest(out_dir, decisions, name="decisions.parquet")

    # 3. Metrics and gallery.
    if metrics_path is not None:
        write_json(metrics_path, filter_metrics(frame, decisions))
    if gallery_path is not None:
        write_filter_gallery(
            label_dir, frame, decisions, vocab, params.gallery_samples, gallery_path, seed
        )
    return kept


def filter_metrics(frame: pd.DataFrame, decisions: pd.DataFrame) -> dict:
    """Kept ratio, drops per first reason and per any reason, and oracle IoU kept vs dropped."""
    n = len(decisions)
    first = decisions["reason"].value_counts()
    anyr = pd.Series([r for rs in decisions["reasons"] for r in rs]).value_counts()
    out = {
        "samples": int(n),
        "kept": int(decisions["kept"].sum()),
        "kept_ratio": round(float(decisions["kept"].mean()), 4) if n else 0.0,
        "dropped": {r: int(first.get(r, 0)) for r in REASONS},
        "flagged": {r: int(anyr.get(r, 0)) for r in REASONS},
    }
    iou = frame["oracle_iou"]
    if iou.notna().any():
        kept = decisions["kept"].to_numpy()
        out["oracle_miou_kept"] = _round(iou[kept].mean())
        out["oracle_miou_dropped"] = _round(iou[~kept].mean())
    return out


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def write_filter_gallery(
    label_dir: Path,
    frame: pd.DataFrame,
    decisions: pd.DataFrame,
    vocab: Vocabulary,
    per_side: int,
    path: str | Path,
    seed: int = 0,
) -> None:
    """A PNG of rows of kept then dropped samples (positive | counterfactual | mask overlay,
    ignore pixels grey), each captioned with its id and decision, and a legend of the classes
    shown. ``per_side`` samples of each side, picked from stream ``filter.gallery``."""
    if per_side == 0:
        return
    pick = rng(seed, "filter.gallery")
    chosen = []
    for kept in (True, False):
        idx = np.flatnonzero(decisions["kept"].to_numpy() == kept)
        chosen += sorted(pick.choice(idx, size=min(per_side, len(idx)), replace=False))
    colours = palette(len(vocab))
    ignore = ignore_index(len(vocab))
    rows, captions, masks = [], [], []
    for i in chosen:
        row, dec = frame.iloc[i], decisions.iloc[i]
        try:
            pos = read_image(label_dir / row["image"])
            cf = read_image(label_dir / row["cf_image"])
        except DataError:
            continue
        h, w = pos.shape[:2]
        mask = read_mask(label_dir / row["mask"]) if row["mask"] else np.zeros((h, w), np.int64)
        factor = max(1, GALLERY_TILE // h)
        rows.append([upscale(im, factor) for im in (pos, cf, overlay(pos, mask, colours, ignore))])
        decision = "kept" if dec["kept"] else f"dropped: {dec['reason']}"
        captions.append(f"{row['id']}  {decision}")
        masks.append(mask)
    if rows:
        legend_items = class_legend(masks, list(vocab.names), colours)
        write_gallery(path, rows, captions, legend_items)
