"""The ``label`` stage: a class-indexed mask per positive image."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from magicseg.config import LabelParams
from magicseg.errors import DataError
from magicseg.io import (
    ignore_index,
    read_image,
    read_manifest,
    read_mask,
    write_json,
    write_manifest,
    write_mask,
)
from magicseg.label.base import Labeler, LabelInput, LabelResult
from magicseg.registry import Registry

LABELERS: Registry[Labeler] = Registry("labeler")


@LABELERS.register("difference")
def _difference(params: LabelParams) -> Labeler:
    from magicseg.label.difference import DifferenceLabeler

    return DifferenceLabeler(params.difference)


@LABELERS.register("grounded_sam")
def _grounded_sam(params: LabelParams) -> Labeler:
    from magicseg.label.grounded_sam import GroundedSamLabeler

    return GroundedSamLabeler(params.grounded_sam, params.difference)


@LABELERS.register("oracle")
def _oracle(params: LabelParams) -> Labeler:
    from magicseg.label.difference import OracleLabeler

    return OracleLabeler()


def build_labeler(params: LabelParams) -> Labeler:
    return LABELERS.build(params.backend, params)


def mask_stats(mask: np.ndarray, class_ids: Sequence[int], ignore: int) -> dict:
    """Per-class area fraction and connected components, and the ignore share, of one mask."""
    areas, comps = [], []
    for cid in class_ids:
        sel = mask == cid
        areas.append(float(sel.mean()))
        comps.append(int(ndimage.label(sel)[1]))
    return {"areas": areas, "components": comps, "ignore_frac": float((mask == ignore).mean())}


def class_iou(pred: np.ndarray, target: np.ndarray, class_ids: Sequence[int]) -> float:
    """Mean over ``class_ids`` of IoU(pred == c, target == c)."""
    ious = []
    for cid in class_ids:
        p, t = pred == cid, target == cid
        union = (p | t).sum()
        ious.append(float((p & t).sum() / union) if union else 1.0)
    return float(np.mean(ious))


def _load(gen_dir: Path, row) -> LabelInput:
    oracle = read_mask(gen_dir / row.oracle_mask) if row.oracle_mask else None
    return LabelInput(
        id=row.id,
        positive=read_image(gen_dir / row.image),
        counterfactual=read_image(gen_dir / row.cf_image),
        class_ids=tuple(int(i) for i in row.class_ids),
        class_names=tuple(row.class_names),
        oracle_mask=oracle,
    )


def run_label(
    gen_dir: str | Path,
    out_dir: str | Path,
    params: LabelParams,
    num_classes: int,
    metrics_path: str | Path | None = None,
    labeler: Labeler | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Label every generated pair; write ``masks/<id>.png`` and ``manifest.parquet``.

    Manifest columns: id, prompt, class_ids, class_names, image, cf_image, mask (paths relative
    to ``out_dir``; mask None when the images could not be read), areas, components,
    ignore_frac, scores, cf_detected, cf_agreement, oracle_iou (NaN without an oracle mask),
    boxes (XYXY pixels), box_classes, box_scores (one entry per detection; None for labelers
    that do not detect, empty when nothing was detected), backend, meta (JSON).
    """
    # 1. Inputs and labeler, checked before work.
    gen_dir, out_dir = Path(gen_dir), Path(out_dir)
    frame = read_manifest(gen_dir)
    labeler = labeler or build_labeler(params)
    if params.backend == "oracle" and frame["oracle_mask"].isna().any():
        raise DataError("label.backend 'oracle' needs oracle masks: use the procedural generator")
    ignore = ignore_index(num_classes)
    rel = os.path.relpath(gen_dir, out_dir)

    # 2. Label in batches; an unreadable pair is recorded, never fatal.
    rows = []
    records = list(frame.itertuples(index=False))
    for start in tqdm(range(0, len(records), batch_size), desc=f"label ({labeler.name})"):
        chunk = records[start : start + batch_size]
        inputs, readable = [], []
        for row in chunk:
            try:
                inputs.append(_load(gen_dir, row))
                readable.append(row)
            except DataError as err:
                rows.append(_row(row, rel, None, None, {"error": str(err)}, labeler.name, ignore))
        for row, item, res in zip(readable, inputs, labeler.label(inputs, ignore), strict=True):
            write_mask(out_dir / f"masks/{row.id}.png", res.mask, num_classes)
            rows.append(_row(row, rel, item, res, res.meta, labeler.name, ignore))

    # 3. Manifest (in the generate manifest's order) and metrics.
    out = pd.DataFrame(rows).set_index("id").loc[frame["id"]].reset_index()
    write_manifest(out_dir, out)
    if metrics_path is not None:
        write_json(metrics_path, label_metrics(out))
    return out


def _row(row, rel: str, item: LabelInput | None, res: LabelResult | None, meta, backend, ignore):
    ids = [int(i) for i in row.class_ids]
    base = {
        "id": row.id,
        "prompt": row.prompt,
        "class_ids": ids,
        "class_names": list(row.class_names),
        "image": f"{rel}/{row.image}",
        "cf_image": f"{rel}/{row.cf_image}",
        "mask": None,
        "areas": [0.0] * len(ids),
        "components": [0] * len(ids),
        "ignore_frac": 0.0,
        "scores": None,
        "cf_detected": None,
        "cf_agreement": float("nan"),
        "oracle_iou": float("nan"),
        "boxes": None,
        "box_classes": None,
        "box_scores": None,
        "backend": backend,
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    if res is None:
        return base
    base.update(mask_stats(res.mask, ids, ignore))
    base["mask"] = f"masks/{row.id}.png"
    base["scores"] = None if res.scores is None else [float(s) for s in res.scores]
    base["cf_detected"] = None if res.cf_detected is None else [bool(b) for b in res.cf_detected]
    base["cf_agreement"] = float("nan") if res.cf_agreement is None else float(res.cf_agreement)
    if res.detections is not None:
        base["boxes"] = [[float(v) for v in d["box"]] for d in res.detections]
        base["box_classes"] = [int(d["class_id"]) for d in res.detections]
        base["box_scores"] = [float(d["score"]) for d in res.detections]
    if item is not None and item.oracle_mask is not None:
        base["oracle_iou"] = class_iou(res.mask, item.oracle_mask, ids)
    return base


def label_metrics(frame: pd.DataFrame) -> dict:
    has_oracle = frame["oracle_iou"].notna()
    out = {
        "samples": int(len(frame)),
        "unreadable": int(frame["mask"].isna().sum()),
        "oracle_miou": round(float(frame.loc[has_oracle, "oracle_iou"].mean()), 4)
        if has_oracle.any()
        else None,
        "mean_object_area": round(float(frame["areas"].map(sum).mean()), 4),
        "mean_ignore_frac": round(float(frame["ignore_frac"].mean()), 4),
    }
    # detecting labelers: images without any box, boxes per image, failed counterfactuals
    dets = frame["box_scores"].dropna() if "box_scores" in frame else pd.Series([], dtype=object)
    if len(dets):
        out["no_detection"] = int((dets.map(len) == 0).sum())
        out["mean_detections"] = round(float(dets.map(len).mean()), 4)
    cf = frame["cf_detected"].dropna() if "cf_detected" in frame else pd.Series([], dtype=object)
    if len(cf):
        out["cf_detected"] = int(cf.map(lambda flags: bool(len(flags) and any(flags))).sum())
    return out


__all__ = ["LABELERS", "LabelInput", "LabelResult", "Labeler", "build_labeler", "run_label"]
