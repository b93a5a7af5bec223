"""The ``generate`` stage: a positive and a counterfactual image per prompt, same seed."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from magicseg import distributed
from magicseg.batching import batched_with_oom_retry
from magicseg.core import io
from magicseg.core.config import GenerateParams
from magicseg.core.errors import DataError
from magicseg.core.io import (
    IMAGE_SUFFIX,
    mask_dtype,
    read_manifest,
    write_image,
    write_manifest,
    write_mask,
)
from magicseg.core.registry import Registry
from magicseg.generate.base import Pair, PairGenerator, PromptRecord
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

GENERATORS: Registry[PairGenerator] = Registry("generator")


@GENERATORS.register("procedural")
def _procedural(params: GenerateParams) -> PairGenerator:
    from magicseg.generate.procedural import ProceduralGenerator

    return ProceduralGenerator(params.procedural, params.height, params.width)


@GENERATORS.register("diffusers")
def _diffusers(params: GenerateParams) -> PairGenerator:
    from magicseg.generate.diffusers import DiffusersPairGenerator

    return DiffusersPairGenerator(params)


def build_generator(params: GenerateParams) -> PairGenerator:
    return GENERATORS.build(params.backend, params)


def records_from_manifest(frame: pd.DataFrame) -> list[PromptRecord]:
    """Prompt-manifest rows -> generator records."""
    return [
        PromptRecord(
            id=row.id,
            prompt=row.prompt,
            cf_prompt=row.cf_prompt,
            class_ids=tuple(int(i) for i in row.class_ids),
            class_names=tuple(row.class_names),
            seed=int(row.seed),
        )
        for row in frame.itertuples(index=False)
    ]


REQUIRED = ("id", "prompt", "cf_prompt", "class_ids", "class_names", "seed")
TEST_SLEEP_ENV = "MAGICSEG_TEST_SLEEP_PER_SAMPLE"
"""Test-only hook: seconds to sleep after each generated sample, so a test can kill the stage
mid-run. Never set it in real runs."""


def check_prompt_manifest(frame: pd.DataFrame, num_classes: int, source: str | Path) -> None:
    """Refuse, before any work, a prompts manifest that cannot be generated: missing columns,
    no rows, duplicate ids, class ids outside the vocabulary, a prompt without its class."""
    from magicseg.prompts.counterfactual import mentions

    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: prompts manifest lacks column(s) {', '.join(missing)}")
    if not len(frame):
        raise DataError(f"{source}: prompts manifest has no rows")
    dup = frame["id"].duplicated()
    if dup.any():
        raise DataError(f"{source}: duplicate prompt id {frame.loc[dup, 'id'].iloc[0]!r}")
    for row in frame.itertuples(index=False):
        ids, names = list(row.class_ids), list(row.class_names)
        if not ids or len(ids) != len(names):
            raise DataError(f"{source}: prompt {row.id}: class_ids and class_names must pair up")
        bad = [int(i) for i in ids if not 1 <= int(i) <= num_classes]
        if bad:
            raise DataError(
                f"{source}: prompt {row.id}: class id {bad[0]} outside the vocabulary "
                f"(1..{num_classes})"
            )
        for name in names:
            if not mentions(str(row.prompt), str(name)):
                raise DataError(
                    f"{source}: prompt {row.id} does not mention its class {name!r}: "
                    f"{str(row.prompt)[:60]!r}"
                )


def generate_keys(
    records: list[PromptRecord], params: GenerateParams, generator: PairGenerator, num_classes: int
) -> list[str]:
    """Per record, the cache key: everything that determines its files (backend and its
    params block, model fingerprint, image size, mask encoding, prompt, seed, library code).
    Not the batch size, the rank or the order: those do not change a sample."""
    from magicseg.prompts import counterfactual

    block = getattr(params, generator.name, None)
    common = {
        "stage": "generate",
        "backend": generator.name,
        "backend_params": block.model_dump(mode="json") if block is not None else None,
        "fingerprint": str(getattr(generator, "fingerprint", "")),
        "size": [params.height, params.width],
        "image_format": params.image_format,
        "mask_dtype": str(mask_dtype(num_classes)),
        "code": code_fingerprint(
            Path(__file__).parent,
            io.__file__,
            counterfactual.__file__,  # class-name forms: the inpainting region's tokens
            *source_files(type(generator)),
        ),
    }
    return [
        sample_key(
            **common,
            prompt=r.prompt,
            cf_prompt=r.cf_prompt,
            class_ids=list(r.class_ids),
            class_names=list(r.class_names),
            seed=r.seed,
        )
        for r in records
    ]


def run_generate(
    prompts_dir: str | Path,
    out_dir: str | Path,
    params: GenerateParams,
    num_classes: int,
    generator: PairGenerator | None = None,
    *,
    cache_dir: str | Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> pd.DataFrame:
    """Generate every prompt's pair into ``out_dir``.

    Files: ``images/<id>.png`` (positive), ``counterfactual/<id>.png`` (``.jpg`` both with
    ``image_format: jpeg``), ``oracle/<id>.png``
    (exact class-index mask, when the generator knows it), ``cf_region/<id>.png`` (the region
    an inpainting counterfactual repainted: 1 inside, 0 where the two images are identical).
    ``manifest.parquet`` columns: id, prompt, cf_prompt, class_ids, class_names, seed, image,
    cf_image, oracle_mask, cf_region (relative paths; None when absent), backend, meta (JSON,
    with ``counterfactual_mode`` for the diffusers backend).

    Every pair is made once into the per-sample cache ``cache_dir`` (keep it outside DVC
    outputs; None: a temporary ``out_dir/.cache``, removed at the end) and linked into
    ``out_dir``: a killed run resumes where it stopped, a grown prompt set makes only its new
    pairs. Under ``torchrun``/``accelerate launch`` (or explicit ``rank``/``world_size``) each
    rank makes the samples it owns (see :mod:`magicseg.distributed`) and rank 0 merges the
    shards; it returns the manifest, other ranks their shard's rows. The bytes written do not
    depend on the number of ranks, the batch size or the cache state.
    """
    # 1. Read and check the inputs before any work.
    out_dir = Path(out_dir)
    me = distributed.current(rank, world_size)
    frame = read_manifest(prompts_dir)
    check_prompt_manifest(frame, num_classes, Path(prompts_dir) / "manifest.parquet")
    records = records_from_manifest(frame)
    generator = generator or build_generator(params)
    generator.check(records)

    # 2. This rank's samples and the ones the cache lacks.
    keys = generate_keys(records, params, generator, num_classes)
    cache = SampleCache(cache_dir if cache_dir is not None else out_dir / ".cache")
    mine = distributed.shard([r.id for r in records], me)
    todo = [i for i in mine if not cache.has(keys[i])]
    if len(todo) < len(mine):
        print(
            f"generate: rank {me.rank}: {len(mine) - len(todo)} of {len(mine)} pairs from the "
            f"cache {cache.directory}",
            file=sys.stderr,
        )
    if todo and me.world_size > 1:
        distributed.bind_device(me)

    # 3. Generate the missing pairs in batches (halved on out-of-memory); each pair goes into
    #    the cache as soon as it exists, so a kill or an error loses nothing already made.
    sleep = float(os.environ.get(TEST_SLEEP_ENV, 0) or 0)
    todo_records, todo_keys = [records[i] for i in todo], [keys[i] for i in todo]
    batches = batched_with_oom_retry(
        todo_records, params.batch_size, generator.generate, what=f"generate ({generator.name})"
    )
    done = 0
    with tqdm(total=len(todo), desc=f"generate ({generator.name})", unit="pair") as bar:
        for batch, pairs in batches:
            for key, pair in zip(todo_keys[done : done + len(batch)], pairs, strict=True):
                _cache_pair(cache, key, pair, num_classes, params.image_format)
                if sleep:
                    time.sleep(sleep)
            done += len(batch)
            bar.update(len(batch))

    # 4. Materialise this rank's files from the cache; its rows in input order.
    rows = []
    try:
        for i in mine:
            rows.append(
                _link_pair(
                    out_dir, records[i], cache.get(keys[i]), generator.name, params.image_format
                )
            )
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full(err, out_dir, f"every pair is kept in {cache.directory}") from None
        raise

    # 5. One manifest, in the prompts' order (rank 0 merges the shards).
    shard = pd.DataFrame(rows, columns=COLUMNS)
    merged = distributed.gather_shards(
        out_dir, _run_token(keys), shard, me, [r.id for r in records]
    )
    if merged is None:
        distributed.finish(out_dir, me)
        return shard
    write_manifest(out_dir, merged)
    if cache_dir is None:
        shutil.rmtree(cache.directory, ignore_errors=True)
    remove_stale_temps(out_dir)
    distributed.finish(out_dir, me)
    return merged


COLUMNS = [
    "id",
    "prompt",
    "cf_prompt",
    "class_ids",
    "class_names",
    "seed",
    "image",
    "cf_image",
    "oracle_mask",
    "cf_region",
    "backend",
    "meta",
]


def _run_token(keys: list[str]) -> str:
    return distributed.run_token("generate", *keys)


def _cache_pair(
    cache: SampleCache, key: str, pair: Pair, num_classes: int, image_format: str
) -> None:
    ext = IMAGE_SUFFIX[image_format]
    writers = {
        f"positive{ext}": lambda p: write_image(p, pair.positive, image_format),
        f"counterfactual{ext}": lambda p: write_image(p, pair.counterfactual, image_format),
    }
    if pair.oracle_mask is not None:
        writers["oracle.png"] = lambda p: write_mask(p, pair.oracle_mask, num_classes)
    if pair.cf_region is not None:
        writers["cf_region.png"] = lambda p: write_mask(p, pair.cf_region.astype(np.uint8), 1)
    cache.put(key, writers, {"meta": json.dumps(pair.meta, sort_keys=True)})


def _link_pair(
    out: Path, rec: PromptRecord, entry: dict | None, backend: str, image_format: str
) -> dict:
    if entry is None:  # made by this rank a moment ago: only a concurrent deletion loses it
        raise DataError(f"sample {rec.id}: its cache entry vanished; re-run the stage")
    files = entry["files"]
    ext = IMAGE_SUFFIX[image_format]
    image, cf_image = f"images/{rec.id}{ext}", f"counterfactual/{rec.id}{ext}"
    materialise(files[f"positive{ext}"], out / image)
    materialise(files[f"counterfactual{ext}"], out / cf_image)
    oracle = region = None
    if "oracle.png" in files:
        oracle = f"oracle/{rec.id}.png"
        materialise(files["oracle.png"], out / oracle)
    if "cf_region.png" in files:
        region = f"cf_region/{rec.id}.png"
        materialise(files["cf_region.png"], out / region)
    return {
        "id": rec.id,
        "prompt": rec.prompt,
        "cf_prompt": rec.cf_prompt,
        "class_ids": list(rec.class_ids),
        "class_names": list(rec.class_names),
        "seed": rec.seed,
        "image": image,
        "cf_image": cf_image,
        "oracle_mask": oracle,
        "cf_region": region,
        "backend": backend,
        "meta": entry["meta"],
    }


__all__ = ["GENERATORS", "Pair", "PairGenerator", "PromptRecord", "build_generator", "run_generate"]
