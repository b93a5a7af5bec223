"""The ``evaluate`` stage: mIoU of a checkpoint on a held-out procedural test set.

The test set is rendered here, by :class:`magicseg.generate.procedural.ProceduralGenerator`, with
seeds ``derive_seed(seed, "test", i)`` that never coincide with the training samples' seeds
(``derive_seed(seed, "sample", id)``), with prompts from the template writer; its labels are the
renderer's exact masks. Every vocabulary class is drawn (each about ``test_samples / K`` times,
a share of images with two classes), the held-out ones included, and every pixel is scored
against *all* vocabulary classes (no sampling at test time).

Reported (``metrics`` dict, nested: ``procedural.miou`` ...):

- ``miou``: mean IoU over the foreground classes present in the test set; ``miou_seen`` /
  ``miou_heldout``: over the trained / held-out classes; ``miou_heldout_combination`` /
  ``miou_heldout_novel``: over the held-out classes of each kind (new combinations of seen
  words / a word no training class has); ``hiou``: harmonic mean of seen and held-out;
  ``iou_background``; ``pixel_acc``;
- ``cf_fg_rate``: share of the counterfactual images' pixels predicted as any class (the
  objects were removed there, so ideally 0);
- ``baselines.all_background`` and ``baselines.most_frequent`` (every pixel the test set's most
  frequent foreground class: a constant predictor that knows the test distribution), same keys.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magicseg.config import EvaluateParams, ProceduralGeneratorParams
from magicseg.errors import BackendError, DataError
from magicseg.generate.base import PromptRecord
from magicseg.io import atomic_path, ignore_index, read_manifest, write_image, write_json
from magicseg.metrics import ConfusionMatrix
from magicseg.model import TextEncoder, load_checkpoint
from magicseg.model.predictor import Predictor, to_tensor
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.counterfactual import make_counterfactual
from magicseg.prompts.template import TemplateWriter
from magicseg.seeding import derive_seed
from magicseg.viz import colorize, grid, legend, overlay, palette, stack_vertical, upscale
from magicseg.vocabulary import Vocabulary

TWO_CLASS_FRACTION = 0.3


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
    perm = np.random.default_rng([seed, 11]).permutation(np.arange(1, k + 1))
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, 12, i])
        ids = [int(perm[i % k])]
        if k > 1 and rng.random() < TWO_CLASS_FRACTION:
            ids.append(int(rng.choice([c for c in range(1, k + 1) if c != ids[0]])))
        names = tuple(vocab.display[c - 1] for c in ids)
        prompt = writer.write([PromptRequest(names, 1, derive_seed(seed, "test-prompt", i))])[0][0]
        records.append(
            PromptRecord(
                id=f"test{i:06d}",
                prompt=prompt,
                cf_prompt=make_counterfactual(prompt, names),
                class_ids=tuple(ids),
                class_names=names,
                seed=derive_seed(seed, "test", i),
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


def _summary(
    cm: ConfusionMatrix,
    seen: Sequence[int],
    heldout: Sequence[int],
    combination: Sequence[int] = (),
    novel: Sequence[int] = (),
) -> dict:
    """mIoU over the present classes of each group (``heldout`` = ``combination`` + ``novel``,
    the two kinds of :meth:`Vocabulary.holdout_kind`), background IoU, pixel accuracy, hIoU."""
    present = set(np.flatnonzero(cm.present()).tolist())
    fg = [c for c in range(1, cm.num_classes) if c in present]
    s = [c for c in seen if c in present]
    h = [c for c in heldout if c in present]
    out = {
        "miou": cm.miou(fg),
        "miou_seen": cm.miou(s),
        "miou_heldout": cm.miou(h),
        "miou_heldout_combination": cm.miou([c for c in combination if c in present]),
        "miou_heldout_novel": cm.miou([c for c in novel if c in present]),
        "iou_background": float(cm.iou()[0]),
        "pixel_acc": cm.pixel_accuracy(),
    }
    a, b = out["miou_seen"], out["miou_heldout"]
    out["hiou"] = 2 * a * b / (a + b) if np.isfinite(a) and np.isfinite(b) and a + b > 0 else None
    return {
        k: (None if v is None or not np.isfinite(v) else round(float(v), 4)) for k, v in out.items()
    }


def evaluate(
    checkpoint: str | Path,
    vocab_dir: str | Path,
    params: EvaluateParams,
    seed: int,
    metrics_path: str | Path | None = None,
    per_class_path: str | Path | None = None,
    gallery_path: str | Path | None = None,
    text_encoder: TextEncoder | None = None,
) -> dict:
    """Evaluate ``checkpoint`` on ``params.test_samples`` procedural test images.

    Writes (each optional): ``metrics_path`` JSON (the returned dict), ``per_class_path`` CSV
    (columns class, iou, split in {seen, heldout, background}, pixels; a DVC bar plot) and
    ``gallery_path`` PNG (rows of positive | counterfactual | label | prediction | prediction on
    the counterfactual, with a legend). ``text_encoder`` overrides the checkpoint's (tests).
    """
    # 1. Inputs, checked before any work.
    if params.model != "checkpoint":
        raise BackendError(f"evaluate.model: {params.model!r} is not available yet")
    vocab = Vocabulary.from_frame(read_manifest(vocab_dir))
    if vocab.source != "procedural":
        raise DataError(
            f"evaluate: the procedural test set needs vocabulary.source: procedural "
            f"(got {vocab.source!r})"
        )
    ckpt = load_checkpoint(checkpoint, text_encoder=text_encoder)
    if list(ckpt.vocab) != list(vocab.names):
        raise DataError(f"{checkpoint}: trained on another vocabulary than {vocab_dir}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor(ckpt, device=device, bg_threshold=params.bg_threshold)
    predictor.set_classes(list(vocab.names))

    # 2. The test set (seeds disjoint from training) and predictions.
    test = render_test_set(vocab, params.test_samples, seed, params.drift, ckpt.image_size)
    pred = predictor.segment(to_tensor(test.images), params.batch_size).numpy()
    cf_pred = predictor.segment(to_tensor(test.cf_images), params.batch_size).numpy()

    # 3. Confusion matrices: the model and the trivial baselines.
    k = len(vocab)
    ignore = ignore_index(k)
    cm = ConfusionMatrix(k + 1, ignore)
    cm.update(pred, test.masks)
    counts = np.bincount(test.masks[test.masks != ignore].ravel(), minlength=k + 1)
    frequent = int(np.argmax(counts[1:]) + 1)
    kinds = (vocab.heldout_of_kind("combination"), vocab.heldout_of_kind("novel"))
    baselines = {}
    for name, constant in (("all_background", 0), ("most_frequent", frequent)):
        b = ConfusionMatrix(k + 1, ignore)
        b.update(np.full_like(test.masks, constant), test.masks)
        baselines[name] = _summary(b, vocab.trainable, sorted(vocab.holdout), *kinds)
    baselines["most_frequent"]["class"] = vocab.names[frequent - 1]

    metrics = {
        "procedural": {
            **_summary(cm, vocab.trainable, sorted(vocab.holdout), *kinds),
            "cf_fg_rate": round(float((cf_pred > 0).mean()), 4),
            "samples": int(len(test.records)),
        },
        "baselines": baselines,
    }

    # 4. Outputs.
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    if per_class_path is not None:
        write_per_class(per_class_path, cm, vocab)
    if gallery_path is not None and params.gallery:
        write_gallery(gallery_path, test, pred, cf_pred, vocab, params.gallery)
    return metrics


def write_per_class(path: str | Path, cm: ConfusionMatrix, vocab: Vocabulary) -> None:
    """CSV rows (class, iou, split, pixels) for the classes present in the test set."""
    iou = cm.iou()
    pixels = cm.matrix.sum(1) + cm.missed
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "split", "pixels"])
        w.writerow(["background", round(float(iou[0]), 4), "background", int(pixels[0])])
        for c in range(1, cm.num_classes):
            if pixels[c] == 0:
                continue
            split = "heldout" if c in vocab.holdout else "seen"
            value = 0.0 if not np.isfinite(iou[c]) else round(float(iou[c]), 4)
            w.writerow([vocab.names[c - 1], value, split, int(pixels[c])])


def write_gallery(
    path: str | Path,
    test: ProceduralTestSet,
    pred: np.ndarray,
    cf_pred: np.ndarray,
    vocab: Vocabulary,
    count: int,
) -> None:
    """Rows: positive | counterfactual | label | prediction | prediction on the counterfactual,
    upscaled for visibility; a legend of the classes shown underneath. Held-out samples first
    so they are always in view."""
    colours = palette(len(vocab))
    order = sorted(
        range(len(test.records)),
        key=lambda i: (not any(c in vocab.holdout for c in test.records[i].class_ids), i),
    )[:count]
    factor = max(1, 128 // test.images.shape[1])
    rows, shown = [], set()
    for i in order:
        label, p, cp = test.masks[i], pred[i], cf_pred[i]
        shown |= set(np.unique(np.concatenate([label.ravel(), p.ravel(), cp.ravel()])).tolist())
        row = [
            test.images[i],
            test.cf_images[i],
            colorize(label, colours),
            overlay(test.images[i], p, colours),
            overlay(test.cf_images[i], cp, colours),
        ]
        rows.append([upscale(im, factor) for im in row])
    image = grid(rows)
    shown = sorted(c for c in shown if c > 0)
    names = [f"{vocab.names[c - 1]}{' (held out)' if c in vocab.holdout else ''}" for c in shown]
    image = stack_vertical(image, legend(names, [colours[c] for c in shown], image.shape[1]))
    write_image(path, image)
