"""The ``label`` stage: a class-indexed mask per positive image."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from magicseg import distributed
from magicseg.batching import batched_with_oom_retry
from magicseg.core import io
from magicseg.core.config import LabelParams
from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import (
    MANIFEST,
    ignore_index,
    mask_dtype,
    read_image,
    read_manifest,
    read_mask,
    write_json,
    write_manifest,
    write_mask,
)
from magicseg.core.registry import Registry
from magicseg.label.base import Labeler, LabelInput, LabelResult
from magicseg.samplecache import (
    DISK_FULL,
    SampleCache,
    code_fingerprint,
    disk_full,
    materialise,
    remove_stale_temps,
    sample_key,
    source_files,
)

LABELERS: Registry[Labeler] = Registry("labeler")


@LABELERS.register("grounded_proxy")
def _grounded_proxy(params: LabelParams) -> Labeler:
    from magicseg.label.grounded_proxy import GroundedProxyLabeler

    return GroundedProxyLabeler(params.grounded_proxy, params.difference)


@LABELERS.register("difference")
def _difference(params: LabelParams) -> Labeler:
    from magicseg.label.difference import DifferenceLabeler

    return DifferenceLabeler(params.difference)


@LABELERS.register("grounded_sam")
def _grounded_sam(params: LabelParams) -> Labeler:
    from magicseg.label.grounded_sam import GroundedSamLabeler

    return GroundedSamLabeler(params.grounded_sam, params.difference)


@LABELERS.register("sam3")
def _sam3(params: LabelParams) -> Labeler:
    from magicseg.label.sam3 import Sam3Labeler

    return Sam3Labeler(params.sam3, params.difference)


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
    """Read one pair; a corrupt file, a pair of two sizes or an oracle mask of another size is a
    DataError naming the file (recorded for that sample, never fatal)."""
    positive = read_image(gen_dir / row.image)
    counterfactual = read_image(gen_dir / row.cf_image)
    if counterfactual.shape != positive.shape:
        raise DataError(
            f"{gen_dir / row.cf_image}: counterfactual is {_hw(counterfactual)} but the positive "
            f"is {_hw(positive)}"
        )
    oracle = read_mask(gen_dir / row.oracle_mask) if row.oracle_mask else None
    if oracle is not None and oracle.shape != positive.shape[:2]:
        raise DataError(
            f"{gen_dir / row.oracle_mask}: mask is {_hw(oracle)} but the image is {_hw(positive)}"
        )
    return LabelInput(
        id=row.id,
        positive=positive,
        counterfactual=counterfactual,
        class_ids=tuple(int(i) for i in row.class_ids),
        class_names=tuple(row.class_names),
        oracle_mask=oracle,
    )


def _hw(a: np.ndarray) -> str:
    return f"{a.shape[0]}x{a.shape[1]}"


REQUIRED = ("id", "prompt", "class_ids", "class_names", "image", "cf_image", "oracle_mask")
CACHED = (
    "areas",
    "components",
    "ignore_frac",
    "scores",
    "cf_detected",
    "cf_agreement",
    "oracle_iou",
    "boxes",
    "box_classes",
    "box_scores",
    "meta",
)
"""Row fields kept in a sample's cache entry (the rest come from the generate manifest)."""


def label_key(gen_dir: Path, row, common: dict) -> str:
    """The cache key of one pair: labeler and params, mask encoding, classes, and the bytes of
    its input files (so a regenerated image is relabelled). OSError when a file is missing."""
    digests = [
        hashlib.sha256((gen_dir / rel).read_bytes()).hexdigest()
        for rel in (row.image, row.cf_image, row.oracle_mask)
        if rel
    ]
    return sample_key(
        **common,
        class_ids=[int(i) for i in row.class_ids],
        class_names=[str(n) for n in row.class_names],
        inputs=digests,
    )


def run_label(
    gen_dir: str | Path,
    out_dir: str | Path,
    params: LabelParams,
    num_classes: int,
    metrics_path: str | Path | None = None,
    labeler: Labeler | None = None,
    batch_size: int = 16,
    *,
    cache_dir: str | Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> pd.DataFrame:
    """Label every generated pair; write ``masks/<id>.png`` and ``manifest.parquet``.

    Manifest columns: id, prompt, class_ids, class_names, image, cf_image, mask (paths relative
    to ``out_dir``; mask None when the images could not be read), areas, components,
    ignore_frac, scores, cf_detected, cf_agreement, oracle_iou (NaN without an oracle mask),
    boxes (XYXY pixels), box_classes, box_scores (one entry per detection; None for labelers
    that do not detect, empty when nothing was detected), backend, meta (JSON).

    Per-sample cache, ranks and shards as in :func:`magicseg.generate.run_generate`: each rank
    labels the pairs it owns (batches halved on out-of-memory), rank 0 merges the shards and
    writes the metrics. Unreadable pairs are recorded (and warned about), never cached.
    """
    # 1. Inputs and labeler, checked before work.
    gen_dir, out_dir = Path(gen_dir), Path(out_dir)
    me = distributed.current(rank, world_size)
    frame = read_manifest(gen_dir)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{gen_dir}: generate manifest lacks column(s) {', '.join(missing)}")
    if frame["id"].duplicated().any():
        raise DataError(
            f"{gen_dir}: duplicate id {frame.loc[frame['id'].duplicated(), 'id'].iloc[0]!r}"
        )
    labeler = labeler or build_labeler(params)
    if params.backend == "oracle" and frame["oracle_mask"].isna().any():
        raise DataError("label.backend 'oracle' needs oracle masks: use the procedural generator")
    ignore = ignore_index(num_classes)
    rel = os.path.relpath(gen_dir, out_dir)
    block = getattr(params, labeler.name, None)
    common = {
        "stage": "label",
        "backend": labeler.name,
        "backend_params": block.model_dump(mode="json") if block is not None else None,
        "fingerprint": str(getattr(labeler, "fingerprint", "")),
        "num_classes_encoding": [str(mask_dtype(num_classes)), ignore],
        "code": code_fingerprint(Path(__file__).parent, io.__file__, *source_files(type(labeler))),
    }

    # 2. This rank's pairs: keys from the input bytes; the cache's hits; unreadable ones.
    cache = SampleCache(cache_dir if cache_dir is not None else out_dir / ".cache")
    records = list(frame.itertuples(index=False))
    mine = distributed.shard([r.id for r in records], me)
    keys: dict[int, str] = {}
    errors: dict[int, str] = {}
    for i in mine:
        try:
            keys[i] = label_key(gen_dir, records[i], common)
        except OSError as err:
            errors[i] = f"{gen_dir}: cannot read image ({err})"
    todo = [i for i in mine if i in keys and not cache.has(keys[i])]
    if todo and me.world_size > 1:
        distributed.bind_device(me)

    # 3. Label the missing pairs: read a chunk, label it in batches (halved on out-of-memory),
    #    cache each result as soon as it exists.
    size = [batch_size]
    with tqdm(total=len(todo), desc=f"label ({labeler.name})", unit="pair") as bar:
        for start in range(0, len(todo), batch_size):
            chunk, inputs = todo[start : start + batch_size], []
            for i in chunk:
                try:
                    inputs.append((i, _load(gen_dir, records[i])))
                except DataError as err:
                    errors[i] = str(err)
            batches = batched_with_oom_retry(
                inputs,
                size[0],
                lambda b: labeler.label([item for _, item in b], ignore),
                what=f"label ({labeler.name})",
                on_shrink=lambda n: size.__setitem__(0, n),
            )
            for batch, results in batches:
                for (i, item), res in zip(batch, results, strict=True):
                    _check_result(res, item, labeler.name)
                    _cache_result(cache, keys[i], records[i], item, res, ignore, num_classes)
            bar.update(len(chunk))

    # 4. Materialise this rank's masks from the cache; its rows in input order.
    rows = []
    for i in mine:
        row = records[i]
        entry = cache.get(keys[i]) if i not in errors else None
        if entry is None:
            msg = errors.get(i, f"sample {row.id}: no cache entry")
            rows.append(_row(row, rel, None, None, {"error": msg}, labeler.name, ignore))
            continue
        try:
            materialise(entry["files"]["mask.png"], out_dir / f"masks/{row.id}.png")
        except OSError as err:
            if err.errno in DISK_FULL:
                raise disk_full(err, out_dir, f"every mask is kept in {cache.directory}") from None
            raise
        base = _row(row, rel, None, None, None, labeler.name, ignore)
        base.update({k: entry[k] for k in CACHED}, mask=f"masks/{row.id}.png")
        rows.append(base)
    _warn_unreadable([errors[i] for i in mine if i in errors], me)

    # 5. Manifest (in the generate manifest's order; rank 0 merges) and metrics.
    shard = pd.DataFrame(rows, columns=COLUMNS)
    # every rank derives the same token (keys of other ranks' pairs are not known here)
    manifest_digest = hashlib.sha256((gen_dir / MANIFEST).read_bytes()).hexdigest()
    token = distributed.run_token("label", json.dumps(common, sort_keys=True), manifest_digest)
    out = distributed.gather_shards(out_dir, token, shard, me, frame["id"].tolist())
    if out is None:
        distributed.finish(out_dir, me)
        return shard
    write_manifest(out_dir, out)
    if metrics_path is not None:
        write_json(metrics_path, label_metrics(out))
    if cache_dir is None:
        shutil.rmtree(cache.directory, ignore_errors=True)
    remove_stale_temps(out_dir)
    distributed.finish(out_dir, me)
    if len(out) and out["mask"].isna().all():
        raise DataError(
            f"label: none of the {len(out)} pairs in {gen_dir} could be read (first: "
            f"{json.loads(out['meta'].iloc[0]).get('error', '?')})"
        )
    return out


COLUMNS = [
    "id",
    "prompt",
    "class_ids",
    "class_names",
    "image",
    "cf_image",
    "mask",
    *CACHED[:-1],
    "backend",
    "meta",
]


def _check_result(res: LabelResult, item: LabelInput, backend: str) -> None:
    if res.mask.shape != item.positive.shape[:2]:
        raise BackendError(
            f"labeler {backend!r} returned a {_hw(res.mask)} mask for the {_hw(item.positive)} "
            f"image of sample {item.id}"
        )


def _cache_result(
    cache: SampleCache, key: str, row, item: LabelInput, res: LabelResult, ignore, num_classes
) -> None:
    full = _row(row, "", item, res, res.meta, "", ignore)
    cache.put(
        key,
        {"mask.png": lambda p: write_mask(p, res.mask, num_classes)},
        {k: full[k] for k in CACHED},
    )


def _warn_unreadable(messages: list[str], me: distributed.Rank, most: int = 5) -> None:
    for msg in messages[:most]:
        print(f"warning: rank {me.rank}: {msg}", file=sys.stderr)
    if len(messages) > most:
        print(f"warning: rank {me.rank}: ... and {len(messages) - most} more", file=sys.stderr)


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
