"""Evaluation on the real datasets (PASCAL VOC, PASCAL Context, COCO-Object, LVIS).

The protocol of the annotation-free open-vocabulary segmentation literature, with the knobs
of ``params.evaluate``: short side resized to ``short_side``, sliding ``window``/``stride``
(:mod:`magicseg.inference`), the bare class names encoded by the model's text encoder (its
own templates, or ``templates`` instead of them), background from the model's
background class or, with ``bg_threshold``, wherever no class reaches that probability (see
:mod:`magicseg.evaluation.segmenters` for the trained model and the Grounded-SAM baseline).

Metrics per scored variant (``voc`` = 20 classes + background, ``voc20`` without background,
``context`` = 59 classes, ``context60`` with background, ``context60_text`` with background
as a text class (``evaluate.context.protocol``), ``coco_object``, ``lvis``): the
summary of :func:`magicseg.evaluation.report.summarise` over the scored classes (background
included where scored) and ``images``; per-class IoU in ``<per_class_dir>/<variant>.csv``. A
variant without background ignores background pixels and predicts among the K classes only
(a model with logits: argmax over them; Grounded-SAM: an undetected pixel is a miss).
Confusion matrices stream on the model's device; nothing per image is kept but the gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magicseg.core.config import EvaluateParams
from magicseg.evaluation.datasets import REAL_DATASETS, RealDataset, open_real_dataset
from magicseg.evaluation.report import summarise, write_per_class
from magicseg.evaluation.segmenters import Segmenter
from magicseg.metrics import ConfusionMatrix
from magicseg.viz import class_legend, colorize, fit, overlay, palette, write_gallery

GALLERY_TILE = (128, 176)
"""(H, W) every gallery tile is letterboxed into."""


def open_enabled(params: EvaluateParams) -> dict[str, RealDataset]:
    """The readers of the enabled real datasets; layout errors are raised here, before any
    model is loaded."""
    out = {}
    for name in REAL_DATASETS:
        block = getattr(params, name)
        if block.enabled:
            protocol = getattr(block, "protocol", None)
            out[name] = open_real_dataset(name, block.root, block.limit, protocol)
    return out


def score_dataset(
    dataset: RealDataset, segmenter: Segmenter, gallery: int = 0
) -> tuple[dict[str, ConfusionMatrix], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Run ``segmenter`` over ``dataset``: a (1+K)-class confusion matrix per variant
    (streamed on the predictions' device) and the first ``gallery`` (image, label, prediction
    with background) triples."""
    k = len(dataset.names)
    cms = {v: ConfusionMatrix(k + 1, dataset.ignore) for v in dataset.variants}
    shown = []
    templates = getattr(dataset, "templates", None)
    if templates is None:
        segmenter.set_classes(dataset.names)
    else:
        segmenter.set_classes(dataset.names, templates=templates)
    for sample in tqdm(dataset, total=len(dataset), desc=dataset.name, unit="image"):
        with_bg, fg_only = segmenter.segment([sample.image])[0]
        target = torch.from_numpy(sample.label).to(with_bg.device)
        for variant, scored_bg in dataset.variants.items():
            if scored_bg:
                cms[variant].update(with_bg, target)
            else:
                cms[variant].update(fg_only, target.masked_fill(target == 0, dataset.ignore))
        if len(shown) < gallery:
            shown.append((sample.image, sample.label, with_bg.cpu().numpy()))
    return cms, shown


def write_dataset_gallery(
    path: str | Path,
    shown: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    names: Sequence[str],
    ignore: int,
) -> None:
    """Rows image | label | prediction, each letterboxed into :data:`GALLERY_TILE`, and a
    legend of the classes shown (ignore pixels white in the label, grey in overlays)."""
    colours = palette(len(names))
    rows = [
        [
            fit(image, GALLERY_TILE),
            fit(colorize(label, colours, ignore), GALLERY_TILE, nearest=True),
            fit(overlay(image, pred, colours, ignore), GALLERY_TILE),
        ]
        for image, label, pred in shown
    ]
    masks = [m for _, label, pred in shown for m in (label, pred)]
    write_gallery(path, rows, legend_items=class_legend(masks, names, colours))


def score_real_datasets(
    datasets: dict[str, RealDataset],
    segmenter: Segmenter,
    segmenter_name: str,
    gallery_samples: int = 0,
    per_class_dir: str | Path | None = None,
    gallery_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Metrics of ``datasets`` keyed by variant (``{"voc": {...}, "voc20": ...}``), each with
    ``segmenter``: ``segmenter_name``. Writes ``<per_class_dir>/<variant>.csv`` and
    ``<gallery_dir>/<dataset>.png`` (``gallery_samples`` rows) when given."""
    metrics: dict[str, dict] = {}
    for name, dataset in datasets.items():
        cms, shown = score_dataset(dataset, segmenter, gallery_samples if gallery_dir else 0)
        for variant, with_bg in dataset.variants.items():
            scored = range(0 if with_bg else 1, len(dataset.names) + 1)
            metrics[variant] = summarise(cms[variant], scored) | {
                "images": len(dataset),
                "segmenter": segmenter_name,
            }
            if per_class_dir is not None:
                path = Path(per_class_dir) / f"{variant}.csv"
                write_per_class(path, cms[variant], dataset.names, scored)
        if gallery_dir is not None and shown:
            path = Path(gallery_dir) / f"{name}.png"
            write_dataset_gallery(path, shown, dataset.names, dataset.ignore)
    return metrics
