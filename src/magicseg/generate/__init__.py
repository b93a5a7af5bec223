"""The ``generate`` stage: a positive and a counterfactual image per prompt, same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from magicseg.config import GenerateParams
from magicseg.generate.base import Pair, PairGenerator, PromptRecord
from magicseg.io import read_manifest, write_image, write_manifest, write_mask
from magicseg.registry import Registry

GENERATORS: Registry[PairGenerator] = Registry("generator")


@GENERATORS.register("procedural")
def _procedural(params: GenerateParams) -> PairGenerator:
    from magicseg.generate.procedural import ProceduralGenerator

    return ProceduralGenerator(params.procedural, params.height, params.width)


@GENERATORS.register("diffusers")
def _diffusers(params: GenerateParams) -> PairGenerator:
    from magicseg.generate.diffusers_backend import DiffusersPairGenerator

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


def run_generate(
    prompts_dir: str | Path,
    out_dir: str | Path,
    params: GenerateParams,
    num_classes: int,
    generator: PairGenerator | None = None,
) -> pd.DataFrame:
    """Generate every prompt's pair into ``out_dir``.

    Files: ``images/<id>.png`` (positive), ``counterfactual/<id>.png``, ``oracle/<id>.png``
    (exact class-index mask, when the generator knows it). ``manifest.parquet`` columns: id,
    prompt, cf_prompt, class_ids, class_names, seed, image, cf_image, oracle_mask (relative
    paths; oracle_mask None when unknown), backend, meta (JSON).
    """
    # 1. Read and check the inputs before any work.
    out_dir = Path(out_dir)
    records = records_from_manifest(read_manifest(prompts_dir))
    generator = generator or build_generator(params)
    generator.check(records)

    # 2. Generate in batches; write each pair as soon as it exists.
    rows = []
    bs = params.batch_size
    with tqdm(total=len(records), desc=f"generate ({generator.name})", unit="pair") as bar:
        for start in range(0, len(records), bs):
            batch = records[start : start + bs]
            for rec, pair in zip(batch, generator.generate(batch), strict=True):
                rows.append(_write_pair(out_dir, rec, pair, generator.name, num_classes))
            bar.update(len(batch))

    # 3. The manifest.
    frame = pd.DataFrame(rows)
    write_manifest(out_dir, frame)
    return frame


def _write_pair(out: Path, rec: PromptRecord, pair: Pair, backend: str, num_classes: int) -> dict:
    image, cf_image = f"images/{rec.id}.png", f"counterfactual/{rec.id}.png"
    write_image(out / image, pair.positive)
    write_image(out / cf_image, pair.counterfactual)
    oracle = None
    if pair.oracle_mask is not None:
        oracle = f"oracle/{rec.id}.png"
        write_mask(out / oracle, pair.oracle_mask, num_classes)
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
        "backend": backend,
        "meta": json.dumps(pair.meta, sort_keys=True),
    }


__all__ = ["GENERATORS", "Pair", "PairGenerator", "PromptRecord", "build_generator", "run_generate"]
