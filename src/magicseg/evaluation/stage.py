"""The ``evaluate`` stage: :func:`run_evaluate` scores a segmenter on the procedural test set
and the enabled real datasets and writes one metrics file keyed by test set."""

from __future__ import annotations

import sys
from pathlib import Path

from magicseg.core.config import EvaluateParams, GroundedSamParams, Sam3Params
from magicseg.core.errors import DataError
from magicseg.core.io import write_json
from magicseg.core.stage import load_vocabulary
from magicseg.evaluation.datasets import nothing_to_score
from magicseg.evaluation.procedural import render_test_set, score_test_set
from magicseg.evaluation.real import open_enabled, score_real_datasets
from magicseg.evaluation.segmenters import build_segmenters


def run_evaluate(
    checkpoint: str | Path | None,
    vocab_dir: str | Path,
    params: EvaluateParams,
    seed: int,
    grounded_sam: GroundedSamParams | None = None,
    procedural_size: tuple[int, int] = (64, 64),
    metrics_path: str | Path | None = None,
    plots_dir: str | Path | None = None,
    text_encoder=None,
    sam3: Sam3Params | None = None,
) -> dict:
    """The ``evaluate`` stage: ``params.segmenter`` scored on the procedural test set (when
    the vocabulary is the procedural catalogue, the only one it can render) and on the enabled
    real datasets, in one metrics dict keyed by test set (``procedural``, ``baselines``,
    ``voc``, ``voc20``, ...), written to ``metrics_path``. With neither (another vocabulary
    and no real dataset enabled) nothing is loaded or scored: the metrics are
    ``{"test_sets": 0, "note": ...}`` and the note is printed in one line.

    ``checkpoint``: the trained model (``segmenter: trained``; the procedural test set is
    rendered at its training size); ``grounded_sam``: the ``label.grounded_sam`` block
    (``segmenter: grounded_sam``; the test set at ``procedural_size`` = (H, W), give the
    generate stage's); ``sam3``: the ``label.sam3`` block (``segmenter: sam3``, likewise).
    ``plots_dir`` receives ``per_class/<test set>.csv`` and
    ``gallery/<test set>.png``. ``text_encoder`` overrides the checkpoint's (tests).
    """
    # 1. Inputs, checked before any model is loaded: real-dataset layouts, the vocabulary.
    datasets = open_enabled(params)
    vocab = load_vocabulary(vocab_dir)
    procedural = vocab.source == "procedural"
    plots = Path(plots_dir) if plots_dir is not None else None
    if not procedural and not datasets:
        # nothing to score is a result, not an error after hours of training: say so
        note = nothing_to_score(vocab.source)
        print(f"evaluate: {note}", file=sys.stderr)
        metrics = {"test_sets": 0, "note": note}
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
        if metrics_path is not None:
            write_json(metrics_path, metrics)
        return metrics
    if not procedural:
        print(f"evaluate: {vocab.source!r} vocabulary: no procedural test set", file=sys.stderr)

    # 2. The segmenter (one checkpoint load for both protocols).
    segmenters = build_segmenters(params, checkpoint, grounded_sam, text_encoder, sam3)
    metrics: dict = {}

    # 3. The procedural test set (seeds disjoint from training), at the training size.
    if procedural:
        size = procedural_size
        if segmenters.checkpoint is not None:
            if list(segmenters.checkpoint.vocab) != list(vocab.names):
                raise DataError(f"{checkpoint}: trained on another vocabulary than {vocab_dir}")
            size = tuple(segmenters.checkpoint.image_size)
        test_seed = params.test_seed_for(seed)
        test = render_test_set(vocab, params.test_samples, test_seed, params.test_drift, size)
        metrics = score_test_set(
            segmenters.procedural,
            test,
            vocab,
            params.batch_size,
            per_class_path=plots / "per_class/procedural.csv" if plots else None,
            gallery_path=plots / "gallery/procedural.png" if plots else None,
            gallery_samples=params.gallery_samples,
        )
        metrics["procedural"]["segmenter"] = segmenters.name

    # 4. The real datasets.
    metrics |= score_real_datasets(
        datasets,
        segmenters.real,
        segmenters.name,
        params.gallery_samples,
        per_class_dir=plots / "per_class" if plots else None,
        gallery_dir=plots / "gallery" if plots else None,
    )
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics
