"""Readers for the real segmentation datasets evaluate scores, in their standard layouts.

Every reader yields :class:`Sample` (an RGB image and its semantic label in the magicseg
convention: 0 = background, class ``k`` = ``names[k - 1]``, ``ignore`` = not scored) and knows
its class names (from :mod:`magicseg.core.vocabulary` builtins) and whether the dataset scores a
background class. ``open_real_dataset(name, root)`` checks the layout before any image is read;
a missing path is a one-line :class:`DataError` naming the expected layout.

======================  =======  ====================================================
name                    classes  layout (``root`` =)
======================  =======  ====================================================
``voc``                 20 + bg  ``VOCdevkit/VOC2012``: ImageSets/Segmentation/val.txt,
                                 JPEGImages/*.jpg, SegmentationClass/*.png (palette)
``context``             59 + bg  ``VOCdevkit/VOC2010``: ImageSets/SegmentationContext/val.txt,
                                 JPEGImages/*.jpg, SegmentationClassContext/*.png (0..59)
``coco_object``         80 + bg  COCO 2017: annotations/instances_val2017.json, val2017/*.jpg
``lvis``              1203 + bg  COCO 2017 images + lvis_v1_val.json (in root or annotations/)
======================  =======  ====================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicseg.core.errors import DataError
from magicseg.evaluation.datasets.base import RealDataset, Sample, require

REAL_DATASETS = ("voc", "context", "coco_object", "lvis")


def open_real_dataset(
    name: str, root: str | Path | None, limit: int | None = None, protocol: str | None = None
):
    """The reader of real dataset ``name`` (one of :data:`REAL_DATASETS`) on the data at
    ``root``; ``limit``: first ``limit`` images only; ``protocol``: Context's
    (``evaluate.context.protocol``, None: its default)."""
    from magicseg.evaluation.datasets.coco import CocoSemantic
    from magicseg.evaluation.datasets.pascal import ContextDataset, VOCDataset

    readers: dict[str, Callable] = {
        "voc": VOCDataset,
        "context": ContextDataset,
        "coco_object": CocoSemantic.coco_object,
        "lvis": CocoSemantic.lvis,
    }
    if name not in readers:
        raise DataError(f"unknown real dataset {name!r} (choose from {', '.join(REAL_DATASETS)})")
    if not root:
        raise DataError(f"evaluate.{name}.root: not set (the dataset is enabled)")
    if protocol is not None:
        if name != "context":
            raise DataError(f"evaluate.{name}: no protocol to choose (only context has one)")
        return readers[name](Path(root).expanduser(), limit=limit, protocol=protocol)
    return readers[name](Path(root).expanduser(), limit=limit)


def nothing_to_score(source: str) -> str:
    """Why a ``source`` vocabulary with no real dataset enabled has no test set (one line)."""
    return (
        f"nothing scored: the procedural test set needs vocabulary.source: procedural (got "
        f"{source!r}) and no real dataset is enabled (set evaluate.<voc|context|coco_object|"
        "lvis>.enabled and .root)"
    )


def check_real_dataset(name: str, root: str | Path | None) -> str:
    """The layout of real dataset ``name`` at ``root``, checked as its reader checks it but
    without reading the set (no image decoded, no annotation parsed): a short description of
    what was found, or a one-line :class:`DataError` naming ``evaluate.<name>.root``."""
    from magicseg.evaluation.datasets.coco import check_layout
    from magicseg.evaluation.datasets.pascal import ContextDataset, VOCDataset

    if name not in REAL_DATASETS:
        raise DataError(f"unknown real dataset {name!r} (choose from {', '.join(REAL_DATASETS)})")
    if not root:
        raise DataError(f"evaluate.{name}.root: not set (the dataset is enabled)")
    root = Path(root).expanduser()
    if name in ("voc", "context"):
        reader = VOCDataset if name == "voc" else ContextDataset
        return f"{len(reader.check_layout(root))} images listed in {reader.split_file}"
    return check_layout(name, root)


__all__ = [
    "REAL_DATASETS",
    "RealDataset",
    "Sample",
    "check_real_dataset",
    "nothing_to_score",
    "open_real_dataset",
    "require",
]
