"""The ``prompts`` stage: requests of 1-2 classes -> scene descriptions + counterfactual twins."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from magicseg.core.config import PromptsParams
from magicseg.core.errors import DataError
from magicseg.core.io import write_json, write_manifest
from magicseg.core.registry import Registry
from magicseg.core.seeding import derive_seed, rng
from magicseg.core.vocabulary import Vocabulary, display_name
from magicseg.prompts.base import PromptRequest, PromptWriter
from magicseg.prompts.counterfactual import REWRITES, mentions

WRITERS: Registry[PromptWriter] = Registry("prompt writer")


@WRITERS.register("template")
def _template(params: PromptsParams, cache_dir: str | Path | None = None) -> PromptWriter:
    from magicseg.prompts.template import TemplateWriter

    return TemplateWriter(style=params.style)


@WRITERS.register("openai")
def _openai(params: PromptsParams, cache_dir: str | Path | None = None) -> PromptWriter:
    from magicseg.prompts.openai_writer import OpenAIWriter

    return OpenAIWriter(params.openai, cache_dir=cache_dir)


@WRITERS.register("transformers")
def _transformers(params: PromptsParams, cache_dir: str | Path | None = None) -> PromptWriter:
    from magicseg.prompts.transformers_writer import TransformersWriter

    return TransformersWriter(params.transformers, cache_dir=cache_dir)


def build_writer(params: PromptsParams, cache_dir: str | Path | None = None) -> PromptWriter:
    """The selected writer; LLM writers cache their answers under ``cache_dir`` (default
    ``.cache/magicseg/prompts``, relative to the working directory)."""
    return WRITERS.build(params.writer, params, cache_dir=cache_dir)


def plan_requests(vocab: Vocabulary, params: PromptsParams, seed: int) -> list[tuple[int, ...]]:
    """Class ids of each request, balanced: every class appears in as many requests as any
    other, give or take one. A request's first class is the least used so far (ties in a
    seeded order); a ``two_class_fraction`` of requests add a second, different class, the
    least used so far (ties at random). Each request depends only on the ones before it, so
    more requests keep the earlier ones."""
    trainable = np.array(vocab.trainable)
    order = rng(seed, "prompts.plan").permutation(len(trainable))
    uses = np.zeros(len(trainable), np.int64)
    out: list[tuple[int, ...]] = []
    for r in range(params.requests):
        second = rng(seed, "prompts.second_class", r)
        first = int(np.lexsort((order, uses))[0])
        uses[first] += 1
        ids = [int(trainable[first])]
        if len(trainable) > 1 and second.random() < params.two_class_fraction:
            key = uses + second.random(len(uses))
            key[first] = np.inf
            other = int(key.argmin())
            uses[other] += 1
            ids.append(int(trainable[other]))
        out.append(tuple(ids))
    return out


def rewritten(classes: Sequence[str]) -> tuple[str, ...]:
    """The names the "nothing" rewrite replaces: each class name and, for a full LVIS name
    ("yoke (animal equipment)"), then its display form ("yoke"), which a description may use."""
    out = list(classes)
    out += [d for d in map(display_name, classes) if d not in out]
    return tuple(out)


def run_prompts(
    vocab: Vocabulary,
    params: PromptsParams,
    seed: int,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    writer: PromptWriter | None = None,
    chunk: int = 64,
    cache_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Write ``manifest.parquet`` (one row per prompt) to ``out_dir``.

    Columns: id, request, class_ids (list[int]), class_names (list[str], display or full names
    as ``params.class_names`` says),
    prompt, cf_prompt, writer, style, seed (int, the sample seed shared by the pair).
    ``cache_dir``: where LLM writers cache answers; keep it outside ``out_dir`` (DVC deletes
    stage outputs before a run, and the cache is what lets a crashed run resume).
    """
    # 1. Plan the requests (seeded) and build the writer.
    plans = plan_requests(vocab, params, seed)
    names = vocab.names if params.class_names == "full" else vocab.display
    requests = [
        PromptRequest(
            tuple(names[i - 1] for i in ids),
            params.per_request,
            derive_seed(seed, "prompts.request", r),
        )
        for r, ids in enumerate(plans)
    ]
    writer = writer or build_writer(params, cache_dir=cache_dir)

    # 2. Write, in chunks so LLM writers can batch and show progress.
    texts: list[list[str]] = []
    for start in tqdm(range(0, len(requests), chunk), desc="prompts", unit="chunk"):
        texts.extend(writer.write(requests[start : start + chunk]))

    # 3. Keep descriptions that mention their classes; make the counterfactual twins.
    rewrite = REWRITES[params.cf_rewrite]
    rows, dropped = [], 0
    for r, (ids, req, outs) in enumerate(zip(plans, requests, texts, strict=True)):
        for k, text in enumerate(outs):
            if not all(any(mentions(text, n) for n in rewritten([c])) for c in req.classes):
                dropped += 1
                continue
            pid = f"r{r:06d}-{k:03d}"
            rows.append(
                {
                    "id": pid,
                    "request": r,
                    "class_ids": list(ids),
                    "class_names": list(req.classes),
                    "prompt": text,
                    "cf_prompt": rewrite(text, rewritten(req.classes)),
                    "writer": writer.name,
                    "style": params.style,
                    "seed": derive_seed(seed, "generate.sample", pid),
                }
            )
    if not rows:
        raise DataError(
            f"prompts: none of the {sum(map(len, texts))} descriptions from writer "
            f"{writer.name!r} mentions its classes; check the writer's model and answers"
        )

    # 4. Optionally let the writer rewrite the counterfactuals (falls back to the code twin
    # when the rewrite is empty or still mentions a class).
    extra: dict = {}
    if getattr(writer, "llm_counterfactual", False):
        items = [(r["prompt"], r["class_names"], r["seed"]) for r in rows]
        rewrites: list[str | None] = []
        for start in tqdm(range(0, len(items), chunk), desc="counterfactuals", unit="chunk"):
            part = items[start : start + chunk]
            rewrites.extend(writer.rewrite_counterfactuals(part))  # type: ignore[attr-defined]
        used = 0
        for row, cf in zip(rows, rewrites, strict=True):
            if cf and not any(mentions(cf, c) for c in rewritten(row["class_names"])):
                row["cf_prompt"] = cf
                used += 1
        extra["cf_from_llm"] = used
        extra["cf_llm_fallback"] = len(rows) - used
    frame = pd.DataFrame(rows)
    write_manifest(out_dir, frame)

    # 5. Metrics (LLM writers add their token/cost count under "usage").
    if metrics_path is not None:
        metrics = prompt_metrics(frame, len(requests), dropped) | extra
        if callable(getattr(writer, "usage", None)):
            metrics["usage"] = writer.usage()  # type: ignore[attr-defined]
        write_json(metrics_path, metrics)
    return frame


def prompt_metrics(frame: pd.DataFrame, requests: int, dropped: int) -> dict:
    counts = pd.Series([i for ids in frame["class_ids"] for i in ids]).value_counts()
    return {
        "requests": requests,
        "prompts": int(len(frame)),
        "dropped_missing_class": int(dropped),
        "unique_prompts": int(frame["prompt"].nunique()),
        "two_class_share": round(float((frame["class_ids"].map(len) == 2).mean()), 4),
        "classes_covered": int(len(counts)),
        "prompts_per_class_min": int(counts.min()),
        "prompts_per_class_max": int(counts.max()),
        "mean_words": round(float(frame["prompt"].str.split().map(len).mean()), 2),
    }


__all__: Sequence[str] = ["PromptRequest", "PromptWriter", "WRITERS", "build_writer", "run_prompts"]
