"""Evaluation on the real benchmarks (PASCAL VOC, PASCAL Context, COCO-Object, LVIS).

The protocol of the annotation-free open-vocabulary segmentation literature, with the knobs
of ``params.evaluate``: short side resized to ``short_side``, sliding ``window``/``stride``
(:mod:`magicseg.inference`), class names filled into ``templates``, background from the model's
background class or, with ``bg_threshold``, wherever no class reaches that probability.

Two models (``evaluate.model``):

- ``checkpoint``: a trained magicseg model;
- ``grounded_sam``: the zero-shot Grounded-SAM baseline, the ``label.grounded_sam`` labeler used
  directly as a segmenter: caption = the benchmark's class names (split into captions under the
  detector's token limit by :func:`magicseg.label.grounded_sam.build_captions`), boxes -> SAM
  masks -> a class map (overlaps by score), background where nothing was detected. Images go in
  at their own size (the detector and SAM resize them themselves).

Metrics per scored variant (``voc`` = 20 classes + background, ``voc20`` without background,
``context`` = 59 classes, ``context60`` with background, ``coco_object``, ``lvis``): ``miou``
over the scored classes present in labels or predictions (background included where scored),
``pixel_acc``, ``images``; per-class IoU in ``<per_class_dir>/<variant>.csv``. A variant without
background ignores background pixels and predicts among the K classes only (a model with
logits: argmax over them; Grounded-SAM: an undetected pixel is a miss).
Confusion matrices stream on the model's device; nothing per image is kept but the gallery.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magicseg.config import EvaluateParams, GroundedSamParams
from magicseg.datasets import BENCHMARKS, BenchmarkDataset, open_benchmark
from magicseg.errors import BackendError
from magicseg.io import atomic_path, write_image, write_json
from magicseg.metrics import ConfusionMatrix
from magicseg.vocabulary import display_name

Segmenter = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
"""HWC uint8 image -> (with background, foreground only) HxW int64 label maps; the object also
has ``set_classes(names)``."""


# --------------------------------------------------------------------------------------------
# Segmenters
# --------------------------------------------------------------------------------------------
class GroundedSamSegmenter:
    """The Grounded-SAM labeler as a zero-shot segmenter (see the module docstring)."""

    def __init__(self, labeler) -> None:
        self.labeler = labeler
        self.ids: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()

    def set_classes(self, names: Sequence[str]) -> None:
        self.ids = tuple(range(1, len(names) + 1))
        self.names = tuple(display_name(n) for n in names)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from magicseg.label.grounded_sam import compose_mask

        dets = self.labeler.detect([image], [(self.ids, self.names)])[0]
        if dets:
            masks = self.labeler.segment([image], [dets])[0]
            mask = compose_mask(masks, [d.class_id for d in dets], [d.score for d in dets])
        else:
            mask = np.zeros(image.shape[:2], np.int64)
        out = torch.from_numpy(mask)
        return out, out


def checkpoint_segmenter(
    checkpoint: str | Path, params: EvaluateParams, text_encoder=None, device: str | None = None
):
    """A :class:`magicseg.inference.SlidingPredictor` for a trained model, with the protocol
    knobs of ``params``."""
    from magicseg.inference import SlidingPredictor
    from magicseg.model import load_checkpoint
    from magicseg.model.predictor import Predictor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(checkpoint, text_encoder=text_encoder)
    return SlidingPredictor(
        Predictor(ckpt, device=device),
        params.short_side,
        params.window,
        params.stride,
        params.bg_threshold,
        params.templates,
    )


def grounded_sam_segmenter(params: GroundedSamParams) -> GroundedSamSegmenter:
    from magicseg.label.grounded_sam import GroundedSamLabeler

    return GroundedSamSegmenter(GroundedSamLabeler(params))


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def score_dataset(
    dataset: BenchmarkDataset, segmenter: Segmenter, gallery: int = 0
) -> tuple[dict[str, ConfusionMatrix], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Run ``segmenter`` over ``dataset``: a (1+K)-class confusion matrix per variant
    (streamed on the predictions' device) and the first ``gallery`` (image, label, prediction
    with background) triples."""
    k = len(dataset.names)
    cms = {v: ConfusionMatrix(k + 1, dataset.ignore) for v in dataset.variants}
    shown = []
    segmenter.set_classes(dataset.names)
    for sample in tqdm(dataset, total=len(dataset), desc=dataset.name, unit="image"):
        with_bg, fg_only = segmenter(sample.image)
        target = torch.from_numpy(sample.label).to(with_bg.device)
        for variant, scored_bg in dataset.variants.items():
            if scored_bg:
                cms[variant].update(with_bg, target)
            else:
                cms[variant].update(fg_only, target.masked_fill(target == 0, dataset.ignore))
        if len(shown) < gallery:
            shown.append((sample.image, sample.label, with_bg.cpu().numpy()))
    return cms, shown


def summarise(cm: ConfusionMatrix, with_background: bool, images: int) -> dict:
    """``miou`` over the scored classes (NaN-IoU classes left out), ``pixel_acc``, ``images``."""
    classes = range(0 if with_background else 1, cm.num_classes)
    miou = cm.miou(classes)
    iou = cm.iou()
    return {
        "miou": None if not np.isfinite(miou) else round(miou, 4),
        "pixel_acc": round(cm.pixel_accuracy(), 4) if np.isfinite(cm.pixel_accuracy()) else None,
        "classes_scored": int(np.isfinite(iou[list(classes)]).sum()),
        "images": int(images),
    }


def write_class_iou(
    path: str | Path, cm: ConfusionMatrix, names: Sequence[str], with_background: bool
) -> None:
    """CSV rows (class, iou, pixels) for every scored class that has an IoU (a DVC bar plot)."""
    iou = cm.iou()
    pixels = cm.matrix.sum(1) + cm.missed
    labels = ["background", *names]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "pixels"])
        for c in range(0 if with_background else 1, cm.num_classes):
            if np.isfinite(iou[c]):
                w.writerow([labels[c], round(float(iou[c]), 4), int(pixels[c])])


def write_benchmark_gallery(
    path: str | Path,
    shown: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    names: Sequence[str],
    ignore: int,
    size: tuple[int, int] = (128, 176),
) -> None:
    """Rows image | label | prediction (each letterboxed into ``size`` = (H, W)), and a legend
    of the classes shown (ignore pixels white)."""
    from magicseg.viz import colorize, grid, legend, overlay, palette, stack_vertical

    colours = palette(len(names))
    rows, present = [], set()
    for image, label, pred in shown:
        present |= set(np.unique(label).tolist()) | set(np.unique(pred).tolist())
        rows.append(
            [
                _fit(image, size, nearest=False),
                _fit(colorize(label, colours, ignore), size, nearest=True),
                _fit(overlay(image, pred, colours), size, nearest=False),
            ]
        )
    classes = sorted(c for c in present if 0 < c <= len(names))
    picture = grid(rows)
    key = legend([names[c - 1] for c in classes], [colours[c] for c in classes], picture.shape[1])
    write_image(path, stack_vertical(picture, key))


def _fit(image: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """HWC uint8 scaled to fit ``size`` (aspect kept), centred on white."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    small = np.asarray(Image.fromarray(image).resize((nw, nh), resample))
    out = np.full((*size, 3), 255, np.uint8)
    y, x = (size[0] - nh) // 2, (size[1] - nw) // 2
    out[y : y + nh, x : x + nw] = small
    return out


def procedural_baseline(
    segmenter: Segmenter,
    vocab_dir: str | Path,
    params: EvaluateParams,
    seed: int,
    size: tuple[int, int],
    per_class_path: str | Path | None = None,
    gallery_path: str | Path | None = None,
) -> dict:
    """The procedural test set of :func:`magicseg.evaluate.evaluate` (same images, seeds and
    summary keys), scored for a segmenter without a checkpoint (the Grounded-SAM baseline),
    rendered at ``size`` = (H, W). Returns ``{"procedural": {...}}``."""
    from magicseg.evaluate import _summary, render_test_set, write_gallery, write_per_class
    from magicseg.io import ignore_index, read_manifest
    from magicseg.vocabulary import Vocabulary

    vocab = Vocabulary.from_frame(read_manifest(vocab_dir))
    test = render_test_set(vocab, params.test_samples, seed, params.drift, size)
    segmenter.set_classes(list(vocab.names))
    cm = ConfusionMatrix(len(vocab) + 1, ignore_index(len(vocab)))
    pred = np.stack([segmenter(im)[0].cpu().numpy() for im in test.images])
    cf_pred = np.stack([segmenter(im)[0].cpu().numpy() for im in test.cf_images])
    cm.update(pred, test.masks)
    if per_class_path is not None:
        write_per_class(per_class_path, cm, vocab)
    if gallery_path is not None and params.gallery:
        write_gallery(gallery_path, test, pred, cf_pred, vocab, params.gallery)
    kinds = (vocab.heldout_of_kind("combination"), vocab.heldout_of_kind("novel"))
    summary = _summary(cm, vocab.trainable, sorted(vocab.holdout), *kinds)
    summary |= {"cf_fg_rate": round(float((cf_pred > 0).mean()), 4), "samples": len(test.records)}
    return {"procedural": summary | {"model": params.model}}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def open_enabled(params: EvaluateParams) -> dict[str, BenchmarkDataset]:
    """The readers of the enabled benchmarks; layout errors are raised here, before any
    model is loaded."""
    out = {}
    for name in BENCHMARKS:
        block = getattr(params, name)
        if block.enabled:
            out[name] = open_benchmark(name, block.root, block.limit)
    return out


def run_benchmarks(
    params: EvaluateParams,
    checkpoint: str | Path | None = None,
    grounded_sam: GroundedSamParams | None = None,
    per_class_dir: str | Path | None = None,
    gallery_dir: str | Path | None = None,
    datasets: dict[str, BenchmarkDataset] | None = None,
    segmenter: Segmenter | None = None,
    text_encoder=None,
) -> dict[str, dict]:
    """Metrics of the enabled benchmarks, keyed by variant (``{"voc": {...}, "voc20": ...}``).

    The model is ``params.model``: ``checkpoint`` (needs ``checkpoint``) or ``grounded_sam``
    (needs ``grounded_sam``, the ``label.grounded_sam`` block); ``segmenter`` overrides both
    (tests). Writes ``<per_class_dir>/<variant>.csv`` and ``<gallery_dir>/<benchmark>.png``
    (``params.gallery`` rows) when given.
    """
    # 1. Datasets (layout checked) before the model.
    datasets = open_enabled(params) if datasets is None else datasets
    if not datasets:
        return {}

    # 2. The model.
    if segmenter is None:
        if params.model == "grounded_sam":
            if grounded_sam is None:
                raise BackendError(
                    "evaluate.model: grounded_sam needs the label.grounded_sam block"
                )
            segmenter = grounded_sam_segmenter(grounded_sam)
        else:
            if checkpoint is None:
                raise BackendError("evaluate.model: checkpoint needs a checkpoint path")
            segmenter = checkpoint_segmenter(checkpoint, params, text_encoder)

    # 3. Score each benchmark; write its per-class IoU and gallery.
    metrics: dict[str, dict] = {}
    for name, dataset in datasets.items():
        cms, shown = score_dataset(dataset, segmenter, params.gallery if gallery_dir else 0)
        for variant, with_bg in dataset.variants.items():
            metrics[variant] = summarise(cms[variant], with_bg, len(dataset))
            metrics[variant]["model"] = params.model
            if per_class_dir is not None:
                path = Path(per_class_dir) / f"{variant}.csv"
                write_class_iou(path, cms[variant], dataset.names, with_bg)
        if gallery_dir is not None and shown:
            write_benchmark_gallery(
                Path(gallery_dir) / f"{name}.png", shown, dataset.names, dataset.ignore
            )
    return metrics


def evaluate_all(
    checkpoint: str | Path | None,
    vocab_dir: str | Path,
    params: EvaluateParams,
    seed: int,
    grounded_sam: GroundedSamParams | None = None,
    metrics_path: str | Path | None = None,
    per_class_path: str | Path | None = None,
    gallery_path: str | Path | None = None,
    benchmarks_dir: str | Path | None = None,
    procedural_size: tuple[int, int] = (256, 256),
    text_encoder=None,
) -> dict:
    """The ``evaluate`` stage: the procedural test set and the enabled benchmarks, in one
    metrics dict keyed by benchmark, written to ``metrics_path``.

    ``evaluate.model: checkpoint``: :func:`magicseg.evaluate.evaluate` (test set at the
    checkpoint's training size); ``grounded_sam``: :func:`procedural_baseline` at
    ``procedural_size`` (give the generate stage's (height, width) to match the label stage),
    ``grounded_sam`` being the ``label.grounded_sam`` block. ``benchmarks_dir`` receives
    ``per_class/<variant>.csv`` and ``gallery/<benchmark>.png``."""
    from magicseg.evaluate import evaluate

    # 1. Benchmark layouts checked before anything runs.
    datasets = open_enabled(params)

    # 2. The procedural test set.
    segmenter = None
    if params.model == "checkpoint":
        metrics = evaluate(
            checkpoint,
            vocab_dir,
            params,
            seed,
            per_class_path=per_class_path,
            gallery_path=gallery_path,
            text_encoder=text_encoder,
        )
    else:
        if grounded_sam is None:
            raise BackendError("evaluate.model: grounded_sam needs the label.grounded_sam block")
        segmenter = grounded_sam_segmenter(grounded_sam)
        metrics = procedural_baseline(
            segmenter, vocab_dir, params, seed, procedural_size, per_class_path, gallery_path
        )

    # 3. The benchmarks (the output folders exist even with none enabled, for DVC).
    out = Path(benchmarks_dir) if benchmarks_dir is not None else None
    if out is not None:
        (out / "per_class").mkdir(parents=True, exist_ok=True)
        (out / "gallery").mkdir(parents=True, exist_ok=True)
    metrics.update(
        run_benchmarks(
            params,
            checkpoint,
            grounded_sam,
            per_class_dir=out / "per_class" if out else None,
            gallery_dir=out / "gallery" if out else None,
            datasets=datasets,
            segmenter=segmenter,
            text_encoder=text_encoder,
        )
    )
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return metrics
