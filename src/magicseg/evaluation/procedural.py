"""The procedural test set: held-out procedural scenes with exact labels, and their scoring.

The test set is rendered here, by :class:`magicseg.generate.procedural.ProceduralGenerator`,
from the streams ``evaluate.test_*`` of the global seed (``evaluate.test_sample`` gives each
pair's seed, never one of the training samples', which come from ``generate.sample``), with
rich template prompts; its labels are the renderer's exact masks. Every vocabulary class is
drawn (each about ``test_samples / K`` times, a share of images with two classes), the
held-out ones included, and every pixel is scored against *all* vocabulary classes (no
sampling at test time).

Reported (``{"procedural": {...}, "baselines": {...}}``): the summary of
:func:`magicseg.evaluation.report.summarise` over the foreground classes, split into seen and
held-out classes, and the held-out ones by kind (``miou_heldout_combination``: new
combinations of seen words; ``miou_heldout_novel``: a word no training class has);
``cf_fg_rate``, the share of the counterfactual images' pixels predicted as any class (the
objects were removed there, so ideally 0); ``samples``; and the same summary for two trivial
baselines, ``all_background`` and ``most_frequent`` (every pixel the test set's
most frequent foreground class: a constant predictor that knows the test distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from magicseg.core.config import ProceduralGeneratorParams
from magicseg.core.io import ignore_index
from magicseg.core.seeding import derive_seed, rng
from magicseg.core.vocabulary import HOLDOUT_KINDS, Vocabulary
from magicseg.evaluation.report import summarise, write_per_class
from magicseg.evaluation.segmenters import Segmenter
from magicseg.generate.base import PromptRecord
from magicseg.metrics import ConfusionMatrix
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.counterfactual import make_counterfactual
from magicseg.prompts.template import TemplateWriter
from magicseg.viz import class_legend, colorize, overlay, palette, upscale, write_gallery

TWO_CLASS_FRACTION = 0.3
GALLERY_TILE = 128
"""Gallery tiles are enlarged (integer factor) to at least this many pixels."""


@dataclass
class ProceduralTestSet:
    """``images``/``cf_images``: NxHxWx3 uint8; ``masks``: NxHxW int64 exact labels
    (vocabulary indices, 0 = background); ``records``: the prompts they were rendered from."""

    records: list[PromptRecord]
    images: np.ndarray
    cf_images: np.ndarray
    masks: np.ndarray


def make_test_records(vocab: Vocabulary, n: int, seed: int) -> list[PromptRecord]:
    """``n`` prompt records over every vocabulary class (a seeded cycle, so each class gets the
    same share), ``TWO_CLASS_FRACTION`` of them with a second class; rich template prompts."""
    k = len(vocab)
    writer = TemplateWriter(style="rich")
    perm = rng(seed, "evaluate.test_classes").permutation(np.arange(1, k + 1))
    records = []
    for i in range(n):
        second = rng(seed, "evaluate.test_second_class", i)
        ids = [int(perm[i % k])]
        if k > 1 and second.random() < TWO_CLASS_FRACTION:
            ids.append(int(second.choice([c for c in range(1, k + 1) if c != ids[0]])))
        names = tuple(vocab.display[c - 1] for c in ids)
        request = PromptRequest(names, 1, derive_seed(seed, "evaluate.test_prompts", i))
        prompt = writer.write([request])[0][0]
        records.append(
            PromptRecord(
                id=f"test{i:06d}",
                prompt=prompt,
                cf_prompt=make_counterfactual(prompt, names),
                class_ids=tuple(ids),
                class_names=names,
                seed=derive_seed(seed, "evaluate.test_sample", i),
            )
        )
    return records


def render_test_set(
    vocab: Vocabulary, n: int, seed: int, drift: float, size: tuple[int, int]
) -> ProceduralTestSet:
    """Render the procedural test set at ``size`` = (H, W)."""
    from magicseg.generate.procedural import ProceduralGenerator

    gen = ProceduralGenerator(ProceduralGeneratorParams(drift=drift), size[0], size[1])
    records = make_test_records(vocab, n, seed)
    gen.check(records)
    pairs = [gen.render(r) for r in tqdm(records, desc="render test set", unit="pair")]
    return ProceduralTestSet(
        records,
        np.stack([p.positive for p in pairs]),
        np.stack([p.counterfactual for p in pairs]),
        np.stack([p.oracle_mask for p in pairs]).astype(np.int64),
    )


def predict_all(segmenter: Segmenter, images: np.ndarray, batch_size: int, what: str) -> np.ndarray:
    """NxHxW int64 labels (with background) of NxHxWx3 ``images``, ``batch_size`` at a time."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=what, unit="batch"):
        out += [
            lab.cpu().numpy() for lab, _ in segmenter.segment(images[start : start + batch_size])
        ]
    return np.stack(out)


def score_test_set(
    segmenter: Segmenter,
    test: ProceduralTestSet,
    vocab: Vocabulary,
    batch_size: int = 64,
    per_class_path: str | Path | None = None,
    gallery_path: str | Path | None = None,
    gallery_samples: int = 0,
) -> dict:
    """Score ``segmenter`` on ``test`` against every vocabulary class; write the per-class CSV
    and the gallery when given. Returns ``{"procedural": {...}, "baselines": {...}}``."""
    # 1. Predictions on the positives and the counterfactuals.
    segmenter.set_classes(list(vocab.names))
    pred = predict_all(segmenter, test.images, batch_size, "evaluate (procedural)")
    cf_pred = predict_all(segmenter, test.cf_images, batch_size, "evaluate (counterfactuals)")

    # 2. Confusion matrices: the segmenter and the trivial baselines.
    k = len(vocab)
    ignore = ignore_index(k)
    fg, seen, heldout = range(1, k + 1), vocab.trainable, sorted(vocab.holdout)
    kinds = {kind: vocab.heldout_of_kind(kind) for kind in HOLDOUT_KINDS}
    cm = ConfusionMatrix(k + 1, ignore)
    cm.update(pred, test.masks)
    counts = np.bincount(test.masks[test.masks != ignore].ravel(), minlength=k + 1)
    frequent = int(np.argmax(counts[1:]) + 1)
    baselines = {}
    for name, constant in (("all_background", 0), ("most_frequent", frequent)):
        b = ConfusionMatrix(k + 1, ignore)
        b.update(np.full_like(test.masks, constant), test.masks)
        baselines[name] = summarise(b, fg, seen, heldout, kinds)
    baselines["most_frequent"]["class"] = vocab.names[frequent - 1]
    procedural = summarise(cm, fg, seen, heldout, kinds) | {
        "cf_fg_rate": round(float((cf_pred > 0).mean()), 4),
        "samples": int(len(test.records)),
    }

    # 3. Per-class IoU and the gallery.
    if per_class_path is not None:
        by_class = {c: kind for kind, ids in kinds.items() for c in ids}
        write_per_class(per_class_path, cm, vocab.names, range(k + 1), vocab.holdout, by_class)
    if gallery_path is not None and gallery_samples:
        write_test_gallery(gallery_path, test, pred, cf_pred, vocab, gallery_samples)
    return {"procedural": procedural, "baselines": baselines}


def write_test_gallery(
    path: str | Path,
    test: ProceduralTestSet,
    pred: np.ndarray,
    cf_pred: np.ndarray,
    vocab: Vocabulary,
    count: int,
) -> None:
    """Rows: positive | counterfactual | label | prediction | prediction on the counterfactual,
    enlarged for visibility; a legend of the classes shown underneath. Held-out samples first
    so they are always in view."""
    colours = palette(len(vocab))
    ignore = ignore_index(len(vocab))
    order = sorted(
        range(len(test.records)),
        key=lambda i: (not any(c in vocab.holdout for c in test.records[i].class_ids), i),
    )[:count]
    factor = max(1, GALLERY_TILE // test.images.shape[1])
    rows = []
    for i in order:
        row = [
            test.images[i],
            test.cf_images[i],
            colorize(test.masks[i], colours, ignore),
            overlay(test.images[i], pred[i], colours),
            overlay(test.cf_images[i], cf_pred[i], colours),
        ]
        rows.append([upscale(im, factor) for im in row])
    names = [
        f"{n}{' (held out)' if c in vocab.holdout else ''}" for c, n in enumerate(vocab.names, 1)
    ]
    shown = [m for i in order for m in (test.masks[i], pred[i], cf_pred[i])]
    write_gallery(path, rows, legend_items=class_legend(shown, names, colours))
