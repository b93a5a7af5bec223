"""A Hugging Face ``datasets`` export of the kept dataset: Parquet shards for the hub, the same
rows as a ``DatasetDict`` saved to disk, and a dataset card.

Layout of ``out`` (``magicseg export --format hf --out DIR``)::

    DIR/README.md                            dataset card: hub YAML metadata + body (card.py)
    DIR/data/train-00000-of-00003.parquet    Parquet shards, what the hub serves and streams
    DIR/dataset_dict.json, DIR/train/        the same rows as a DatasetDict saved to disk (Arrow):
                                             ``datasets.load_from_disk(DIR)``
    DIR/export.json                          the shards, their sample ids and input digests

One row per sample; the columns are :func:`features`. Images are the stages' files (PNG, or
JPEG with ``generate.image_format: jpeg``) stored byte for byte as ``{"bytes": ..., "path":
None}``: nothing is decoded or re-encoded, so the
masks are byte-identical to the label stage's PNGs (class indices, ``uint8`` or ``uint16`` by
vocabulary size, see :mod:`magicseg.io`).

Memory: samples are read one at a time and written in row groups of at most
``ROW_GROUP_ROWS`` rows and ``ROW_GROUP_BYTES`` bytes, each one both to a Parquet shard and to
the Arrow file of the saved DatasetDict (the layout of ``DatasetDict.save_to_disk``, checked by
loading it back); what stays in memory for the whole run is the manifests and a digest per
sample, never the images (``benchmarks/export_memory.py``). A shard is closed before it would
pass the size budget (one sample bigger than the budget gets a shard of its own). Boundaries
depend only on the inputs, so every run cuts the same shards.

Resumable and atomic: shards are written into ``.DIR.partial/`` beside DIR, each under a
temporary name renamed when complete and recorded in a ledger with a digest of its inputs (the
sample's fields and each file's path, size and mtime). A re-run keeps the shards whose digest
is unchanged (also those of a previous complete export in DIR) and writes only the others; the
finished export replaces DIR at the end. An export whose every input is unchanged is up to
date: only its card is refreshed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from magicseg.core.errors import BackendError, ConfigError, DataError
from magicseg.core.io import atomic_path, mask_dtype, read_json, read_manifest, write_json
from magicseg.core.stage import load_vocabulary
from magicseg.core.vocabulary import Vocabulary

if TYPE_CHECKING:
    from magicseg.export.card import RunInfo

FORMAT_VERSION = 1
SPLIT = "train"
ROW_GROUP_ROWS = 100
"""Rows per Parquet row group (what the hub's viewer and streaming readers fetch at once)."""
ROW_GROUP_BYTES = 32 * 2**20
DEFAULT_SHARD_SIZE = 500 * 10**6
IMAGE_COLUMNS = ("image", "counterfactual_image", "mask")
LEDGER = "ledger.json"
EXPORT_JSON = "export.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS |= {"GIB": 2**30}


def parse_size(text: str | int, key: str = "--shard-size") -> int:
    """Bytes from ``"500MB"``, ``"64KiB"``, ``"1.5GB"`` or a plain number; a bad size is a
    one-line ConfigError naming ``key``."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{key}: {text!r} is not a size (examples: 500MB, 64KiB, 1GB)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConfigError(f"{key}: must be at least 1 byte (got {text!r})")
    return value


def features(vocab: Vocabulary, include_dropped: bool = False):
    """The ``datasets.Features`` of an export row.

    - ``id`` (string): the sample id of every stage's manifest;
    - ``image``, ``counterfactual_image`` (Image, PNG or JPEG, RGB): the positive and its
      counterfactual twin (same seed, the object removed);
    - ``mask`` (Image, PNG, lossless): HW class indices, pixel value ``k`` = vocabulary class
      ``k`` = ``classes`` label ``k - 1``; 0 = background; ignore = 255 (``uint8`` masks, fewer
      than 255 classes) or 65535 (``uint16``);
    - ``classes`` (list of ClassLabel over the vocabulary): the classes the sample was made for;
    - ``prompt``, ``counterfactual_prompt`` (string), ``seed`` (int64): how it was generated;
    - ``scores`` (list of float64, one per class, or null): the labeler's confidence per class;
    - ``boxes`` (list of XYXY float64 pixel boxes, or null), ``box_classes`` (ClassLabel),
      ``box_scores``: the detections behind the mask, null for labelers that do not detect;
    - ``cf_detected`` (list of bool per class, or null): class still found in the
      counterfactual; ``cf_agreement`` (float64 or null): mask vs counterfactual difference IoU;
    - ``reasons`` (list of string): the filter's reasons to drop (empty for kept samples);
    - ``kept`` (bool, only with ``include_dropped``).
    """
    from datasets import ClassLabel, Features, Image, List, Value

    label = ClassLabel(names=list(vocab.names))
    cols = {
        "id": Value("string"),
        "image": Image(),
        "counterfactual_image": Image(),
        "mask": Image(),
        "classes": List(label),
        "prompt": Value("string"),
        "counterfactual_prompt": Value("string"),
        "seed": Value("int64"),
        "scores": List(Value("float64")),
        "boxes": List(List(Value("float64"), length=4)),
        "box_classes": List(label),
        "box_scores": List(Value("float64")),
        "cf_detected": List(Value("bool")),
        "cf_agreement": Value("float64"),
        "reasons": List(Value("string")),
    }
    if include_dropped:
        cols["kept"] = Value("bool")
    return Features(cols)


@dataclass(frozen=True)
class HFExport:
    """What an export wrote: ``rows`` (``kept`` of them kept), ``shards`` Parquet files of
    ``bytes`` bytes in all, ``written`` of them made by this run (the rest reused), and whether
    the export was already ``up_to_date``."""

    out: Path
    rows: int
    kept: int
    shards: int
    bytes: int
    written: int
    up_to_date: bool
    seconds: float
    arrow_bytes: int = 0


@dataclass
class _Plan:
    """The rows to export and their shards (``bounds[k]`` = rows [start, stop) of shard k)."""

    frame: pd.DataFrame  # one row per sample, the columns of _COLUMNS, paths absolute
    digests: list[str]
    sizes: list[int]  # bytes of a sample's files and fields
    bounds: list[tuple[int, int]]
    shard_digests: list[str]
    digest: str


_COLUMNS = (
    "id",
    "prompt",
    "class_ids",
    "image",
    "cf_image",
    "mask",
    "scores",
    "boxes",
    "box_classes",
    "box_scores",
    "cf_detected",
    "cf_agreement",
)


def export_hf(
    filter_dir: str | Path,
    vocab_dir: str | Path,
    generate_dir: str | Path,
    out: str | Path,
    *,
    label_dir: str | Path | None = None,
    include_dropped: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    card: RunInfo | None = None,
    progress: bool = True,
) -> HFExport:
    """Export the kept samples of ``filter_dir`` (all samples of ``label_dir`` with a ``kept``
    flag when ``include_dropped``) as a Hugging Face dataset in ``out``; see the module doc.

    ``generate_dir`` gives each sample's counterfactual prompt and seed. ``card`` is a
    :class:`magicseg.export.card.RunInfo` (the provenance and figures of the run) or None for
    a card without them. Raises a one-line :class:`DataError` before any work when an input is
    missing or inconsistent, or when there is nothing kept to export.
    """
    # 1. Inputs, checked before work.
    t0 = time.perf_counter()
    if importlib.util.find_spec("datasets") is None:
        raise BackendError("export --format hf needs datasets: pip install 'magicseg[hf]'")
    budget = parse_size(shard_size)
    out = Path(out)
    _check_out(out)
    vocab = load_vocabulary(vocab_dir)
    frame, _ = _rows(filter_dir, generate_dir, label_dir, include_dropped, len(vocab))
    feats = features(vocab, include_dropped)

    # 2. Plan: a digest per sample, shard boundaries by size.
    plan = _plan(frame, feats, budget)

    # 3. Up to date? Then only the card is refreshed.
    previous = _read_export_json(out)
    if previous is not None and previous.get("digest") == plan.digest:
        summary = _summary(out, plan, previous, 0, True, t0)
        _write_card(out, summary, vocab, feats, card)
        shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)  # any stale one
        return summary

    # 4. Shards: keep the finished ones whose inputs are unchanged, write the others.
    partial = out.parent / f".{out.name}.partial"
    shard_dir = partial / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    ledger = _load_ledger(partial, out, previous)
    todo = [k for k, d in enumerate(plan.shard_digests) if not _have_shard(shard_dir, ledger, d)]
    _write_shards(plan, todo, shard_dir, ledger, partial, feats, len(vocab), progress)

    # 5. The DatasetDict, export.json and the card in a staging directory, then swapped in.
    staging = partial / "final"
    shutil.rmtree(staging, ignore_errors=True)
    parquet, arrow = _link_shards(plan, shard_dir, staging)
    record = {
        "format": FORMAT_VERSION,
        "digest": plan.digest,
        "rows": len(plan.frame),
        "bytes": sum(f.stat().st_size for f in parquet),
        "arrow_bytes": sum(f.stat().st_size for f in arrow),
        "include_dropped": include_dropped,
        "shard_size": budget,
        "shards": [
            {
                "file": f"data/{f.name}",
                "arrow": f"{SPLIT}/{a.name}",
                "digest": d,
                "rows": stop - start,
                "bytes": f.stat().st_size,
                "arrow_bytes": a.stat().st_size,
                "ids": plan.frame["id"].iloc[start:stop].tolist(),
            }
            for f, a, d, (start, stop) in zip(
                parquet, arrow, plan.shard_digests, plan.bounds, strict=True
            )
        ],
    }
    _dataset_dict_files(staging, arrow, feats, record)
    write_json(staging / EXPORT_JSON, record)
    _readable(staging / EXPORT_JSON)
    summary = _summary(out, plan, record, len(todo), False, t0)
    _write_card(staging, summary, vocab, feats, card)
    _swap_in(staging, out, partial)
    return summary


# --------------------------------------------------------------------------------------------
# 1. inputs
# --------------------------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / EXPORT_JSON).exists()):
        raise DataError(
            f"--out: {out} exists and is not a magicseg hf export: choose another directory or "
            "remove it"
        )


def _rows(
    filter_dir, generate_dir, label_dir, include_dropped: bool, num_classes: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The samples to export, in manifest order, with absolute paths and the generate stage's
    ``cf_prompt`` and ``seed`` joined on; and the filter's decisions (all samples)."""
    filter_dir = Path(filter_dir)
    kept = read_manifest(filter_dir)
    decisions = read_manifest(filter_dir, "decisions.parquet")
    if kept["id"].tolist() != decisions.loc[decisions["kept"], "id"].tolist():
        raise DataError(
            f"{filter_dir}: manifest.parquet and decisions.parquet disagree on the kept "
            "samples: re-run the filter stage"
        )
    if not len(kept) and not include_dropped:
        raise DataError(
            f"{filter_dir}: no kept samples to export (the filter dropped all "
            f"{len(decisions)}; see decisions.parquet, or export them with --include-dropped)"
        )
    if include_dropped:
        if label_dir is None:
            raise ConfigError("--include-dropped: needs the label stage output (--labels)")
        root = Path(label_dir)
        frame = read_manifest(root)
        if frame["id"].tolist() != decisions["id"].tolist():
            raise DataError(
                f"{root}: its samples are not those of {filter_dir}/decisions.parquet: re-run "
                "the filter stage"
            )
        if not len(frame):
            raise DataError(f"{root}: no samples to export")
    else:
        root, frame = filter_dir, kept
    frame = frame.reset_index(drop=True).copy()
    for col in _COLUMNS:
        if col not in frame.columns:
            if col in ("id", "prompt", "class_ids", "image", "cf_image", "mask"):
                raise DataError(f"{root}/manifest.parquet: no column {col!r}")
            frame[col] = None
    for col in ("image", "cf_image", "mask"):
        frame[col] = [_absolute(root, p) for p in frame[col]]

    gen = read_manifest(generate_dir)
    missing = {"id", "cf_prompt", "seed"} - set(gen.columns)
    if missing:
        raise DataError(
            f"{generate_dir}/manifest.parquet: no column(s) {', '.join(sorted(missing))}"
        )
    gen = gen.set_index("id")
    absent = ~frame["id"].isin(gen.index)
    if absent.any():
        raise DataError(
            f"{generate_dir}: no sample {frame.loc[absent, 'id'].iloc[0]!r} of {root} (the "
            "stages' outputs come from different runs: dvc repro)"
        )
    frame["cf_prompt"] = gen.loc[frame["id"], "cf_prompt"].to_numpy()
    frame["seed"] = gen.loc[frame["id"], "seed"].to_numpy()
    dec = decisions.set_index("id").loc[frame["id"]]
    frame["kept"] = dec["kept"].to_numpy(bool)
    frame["reasons"] = [list(r) if r is not None else [] for r in dec["reasons"]]
    for ids in frame["class_ids"]:
        bad = [int(c) for c in ids if not 1 <= int(c) <= num_classes]
        if bad:
            raise DataError(f"{root}: class id {bad[0]} outside the vocabulary (1..{num_classes})")
    return frame, decisions


def _absolute(root: Path, rel) -> str | None:
    if rel is None or (isinstance(rel, float) and math.isnan(rel)):
        return None
    return os.path.normpath(os.path.join(root, rel))


# --------------------------------------------------------------------------------------------
# 2. plan
# --------------------------------------------------------------------------------------------
def _fields(row, include_dropped: bool) -> dict:
    """The row's columns without the images, as the Parquet schema stores them."""
    out = {
        "id": str(row.id),
        "classes": [int(c) - 1 for c in row.class_ids],
        "prompt": str(row.prompt),
        "counterfactual_prompt": str(row.cf_prompt),
        "seed": int(row.seed),
        "scores": _floats(row.scores),
        "boxes": None if _null(row.boxes) else [[float(v) for v in b] for b in row.boxes],
        "box_classes": None if _null(row.box_classes) else [int(c) - 1 for c in row.box_classes],
        "box_scores": _floats(row.box_scores),
        "cf_detected": None if _null(row.cf_detected) else [bool(b) for b in row.cf_detected],
        "cf_agreement": None if _null(row.cf_agreement) else float(row.cf_agreement),
        "reasons": [str(r) for r in row.reasons],
    }
    if include_dropped:
        out["kept"] = bool(row.kept)
    return out


def _null(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _floats(x) -> list[float] | None:
    return None if _null(x) else [float(v) for v in x]


def _files(row) -> dict[str, str | None]:
    return {"image": row.image, "counterfactual_image": row.cf_image, "mask": row.mask}


def _plan(frame: pd.DataFrame, feats, budget: int) -> _Plan:
    """A digest and a size per sample (its fields, its files' path, size and mtime), shard
    boundaries, and a digest per shard and for the whole export. A missing file of a readable
    sample is a DataError."""
    import pyarrow

    include_dropped = "kept" in feats
    schema = feats.arrow_schema.metadata[b"huggingface"].decode()
    header = json.dumps(
        [FORMAT_VERSION, schema, ROW_GROUP_ROWS, ROW_GROUP_BYTES, pyarrow.__version__]
    )
    digests, sizes = [], []
    for row in frame.itertuples(index=False):
        fields = _fields(row, include_dropped)
        stats = []
        for name, path in _files(row).items():
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            if st is None and row.mask is not None:  # readable sample: every file must be there
                raise DataError(f"{path}: missing (the stage outputs are incomplete: dvc repro)")
            stats.append([name, path, st.st_size if st else None, st.st_mtime_ns if st else None])
        text = json.dumps([fields, stats], sort_keys=True)
        digests.append(hashlib.sha256(text.encode()).hexdigest())
        sizes.append(len(text) + sum(s[2] or 0 for s in stats))

    bounds, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and acc + size > budget:
            bounds.append((start, i))
            start, acc = i, 0
        acc += size
    if len(sizes):
        bounds.append((start, len(sizes)))
    shard_digests = [
        hashlib.sha256((header + "".join(digests[a:b])).encode()).hexdigest() for a, b in bounds
    ]
    total = hashlib.sha256(json.dumps([budget, shard_digests]).encode()).hexdigest()
    return _Plan(frame, digests, sizes, bounds, shard_digests, total)


def _row_groups(plan: _Plan, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """Row groups of a shard: at most ROW_GROUP_ROWS rows and (past one row) ROW_GROUP_BYTES."""
    a = start
    while a < stop:
        b, acc = a, 0
        while b < stop and b - a < ROW_GROUP_ROWS:
            size = plan.sizes[b]
            if b > a and acc + size > ROW_GROUP_BYTES:
                break
            acc += size
            b += 1
        yield a, b
        a = b


# --------------------------------------------------------------------------------------------
# 4. shards
# --------------------------------------------------------------------------------------------
def _read_export_json(out: Path) -> dict | None:
    path = out / EXPORT_JSON
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT_VERSION:
        return None
    shards = record.get("shards", [])
    if not all((out / s["file"]).is_file() and (out / s["arrow"]).is_file() for s in shards):
        return None
    return record


def _load_ledger(partial: Path, out: Path, previous: dict | None) -> dict:
    """Finished shards by digest: the partial export's ledger, plus the shards of a previous
    complete export in ``out`` (hard-linked into the partial directory, copied where links
    are not possible)."""
    try:
        ledger = read_json(partial / LEDGER)
        if ledger.get("format") != FORMAT_VERSION:
            raise ValueError
    except (OSError, ValueError):
        ledger = {"format": FORMAT_VERSION, "shards": {}}
    for stale in (partial / "shards").glob(".*.tmp"):  # a shard being written when killed
        stale.unlink(missing_ok=True)
    for shard in (previous or {}).get("shards", []):
        digest = shard["digest"]
        if digest in ledger["shards"]:
            continue
        for src, ext in ((shard["file"], "parquet"), (shard["arrow"], "arrow")):
            target = partial / "shards" / f"{digest}.{ext}"
            target.unlink(missing_ok=True)
            _link_or_copy(out / src, target)
        ledger["shards"][digest] = {"bytes": shard["bytes"], "arrow_bytes": shard["arrow_bytes"]}
    return ledger


def _have_shard(shard_dir: Path, ledger: dict, digest: str) -> bool:
    """A finished shard: both files there, of the sizes the ledger recorded."""
    entry = ledger["shards"].get(digest)
    if entry is None:
        return False
    for ext, key in (("parquet", "bytes"), ("arrow", "arrow_bytes")):
        path = shard_dir / f"{digest}.{ext}"
        if not path.is_file() or path.stat().st_size != entry[key]:
            return False
    return True


def _write_shards(
    plan: _Plan, todo: list[int], shard_dir: Path, ledger: dict, partial: Path, feats, K, progress
) -> None:
    """Write each shard of ``todo`` (streaming its samples), recording it in the ledger."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    schema = feats.arrow_schema
    include_dropped = "kept" in feats
    dtype = mask_dtype(K)
    rows = sum(plan.bounds[k][1] - plan.bounds[k][0] for k in todo)
    with tqdm(total=rows, desc="export (hf)", unit="sample", disable=not progress) as bar:
        for k in todo:
            start, stop = plan.bounds[k]
            digest = plan.shard_digests[k]
            parquet, arrow = shard_dir / f"{digest}.parquet", shard_dir / f"{digest}.arrow"
            with atomic_path(parquet) as tmp_parquet, atomic_path(arrow) as tmp_arrow:
                # PNG bytes neither compress nor repeat: no dictionary pages, sizes as planned
                pq_writer = pq.ParquetWriter(tmp_parquet, schema, use_dictionary=False)
                arrow_sink = pa.OSFile(str(tmp_arrow), "wb")
                arrow_writer = pa.ipc.new_stream(arrow_sink, schema)
                try:
                    for a, b in _row_groups(plan, start, stop):
                        batch = []
                        for row in plan.frame.iloc[a:b].itertuples(index=False):
                            batch.append(_fields(row, include_dropped) | _images(row, dtype))
                            bar.update(1)
                        table = pa.Table.from_pylist(batch, schema=schema)
                        pq_writer.write_table(table)
                        arrow_writer.write_table(table)
                        del batch, table
                finally:
                    pq_writer.close()
                    arrow_writer.close()
                    arrow_sink.close()
                _readable(tmp_parquet)
                _readable(tmp_arrow)
            ledger["shards"][digest] = {
                "bytes": parquet.stat().st_size,
                "arrow_bytes": arrow.stat().st_size,
            }
            write_json(partial / LEDGER, ledger)


def _images(row, dtype) -> dict:
    """The row's PNG files as Image structs, bytes untouched. An unreadable sample (no mask)
    gets null for images that do not decode; a mask PNG whose bit depth does not fit the
    vocabulary is a DataError."""
    out = {}
    for name, path in _files(row).items():
        data = _read_bytes(path) if path is not None else None
        if data is not None and row.mask is None and not _decodes(data):
            data = None
        if name == "mask" and data is not None:
            _check_mask_png(path, data, dtype)
        out[name] = None if data is None else {"bytes": data, "path": None}
    return out


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _decodes(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means "unreadable"
        return False


def _check_mask_png(path: str, data: bytes, dtype) -> None:
    """A grayscale PNG of the vocabulary's bit depth (8 for uint8, 16 for uint16)."""
    want = 8 * dtype.itemsize
    ok = data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    depth, colour = (data[24], data[25]) if ok else (None, None)
    if not ok or depth != want or colour != 0:
        raise DataError(
            f"{path}: not a {want}-bit grayscale PNG mask as the vocabulary needs ({dtype}): "
            "re-run the label stage"
        )


# --------------------------------------------------------------------------------------------
# 5. DatasetDict, card, swap
# --------------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _link_shards(plan: _Plan, shard_dir: Path, staging: Path) -> tuple[list[Path], list[Path]]:
    """The finished shards under their final names: ``data/train-K-of-N.parquet`` and
    ``train/data-K-of-N.arrow`` (hard links: no copy)."""
    n = len(plan.bounds)
    parquet, arrow = [], []
    for k, digest in enumerate(plan.shard_digests):
        parquet.append(staging / "data" / f"{SPLIT}-{k:05d}-of-{n:05d}.parquet")
        arrow.append(staging / SPLIT / f"data-{k:05d}-of-{n:05d}.arrow")
        _link_or_copy(shard_dir / f"{digest}.parquet", parquet[-1])
        _link_or_copy(shard_dir / f"{digest}.arrow", arrow[-1])
    return parquet, arrow


def _dataset_dict_files(staging: Path, arrow: list[Path], feats, record: dict) -> None:
    """The metadata ``DatasetDict.save_to_disk`` writes beside its Arrow files (the split's
    ``state.json`` and ``dataset_info.json``, ``dataset_dict.json``), then a check that
    ``datasets`` loads it back with these features and rows."""
    try:
        import datasets
    except ImportError:
        raise BackendError(
            "export --format hf needs datasets: pip install 'magicseg[hf]'"
        ) from None

    split_dir = staging / SPLIT
    state = {
        "_data_files": [{"filename": f.name} for f in arrow],
        "_fingerprint": record["digest"][:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": SPLIT,
    }
    write_json(split_dir / "state.json", state)
    splits = datasets.SplitDict()
    splits.add(
        datasets.SplitInfo(name=SPLIT, num_bytes=record["arrow_bytes"], num_examples=record["rows"])
    )
    info = datasets.DatasetInfo(
        features=feats,
        splits=splits,
        download_size=record["bytes"],
        dataset_size=record["arrow_bytes"],
    )
    info.write_to_directory(str(split_dir), pretty_print=True)
    write_json(staging / "dataset_dict.json", {"splits": [SPLIT]})
    for path in (split_dir / "state.json", split_dir / "dataset_info.json"):
        _readable(path)
    _readable(staging / "dataset_dict.json")

    loaded = datasets.load_from_disk(str(staging))  # memory-mapped: reads no image
    if loaded[SPLIT].features != feats or len(loaded[SPLIT]) != record["rows"]:
        raise BackendError(
            f"datasets {datasets.__version__} reads the saved DatasetDict back differently: "
            "report this with the datasets version"
        )
    del loaded


def _write_card(out: Path, summary: HFExport, vocab, feats, run) -> None:
    from magicseg.export.card import render_card

    text = render_card(summary, vocab, feats, run)
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
        _readable(tmp)


def _swap_in(staging: Path, out: Path, partial: Path) -> None:
    """Replace ``out`` by ``staging``; the partial directory (old export, shards) goes."""
    if out.exists():
        shutil.rmtree(partial / "old", ignore_errors=True)  # left by a swap that was killed
        os.replace(out, partial / "old")
    os.replace(staging, out)
    shutil.rmtree(partial, ignore_errors=True)


def _summary(out, plan: _Plan, record: dict, written, up_to_date, t0) -> HFExport:
    return HFExport(
        out=Path(out),
        rows=len(plan.frame),
        kept=int(plan.frame["kept"].sum()),
        shards=len(plan.bounds),
        bytes=int(record["bytes"]),
        written=written,
        up_to_date=up_to_date,
        seconds=round(time.perf_counter() - t0, 2),
        arrow_bytes=int(record.get("arrow_bytes", 0)),
    )


def _readable(path: Path) -> None:
    """Temporary files are created owner-only: a shared export gets the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
