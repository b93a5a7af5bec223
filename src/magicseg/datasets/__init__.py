"""Readers for the real segmentation benchmarks, in their standard layouts.

Every reader yields :class:`Sample` (an RGB image and its semantic label in the magicseg
convention: 0 = background, class ``k`` = ``names[k - 1]``, ``ignore`` = not scored) and knows
its class names (from :mod:`magicseg.vocabulary` builtins) and whether the benchmark scores a
background class. ``open_benchmark(name, root)`` checks the layout before any image is read;
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

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from magicseg.errors import DataError


@dataclass
class Sample:
    """``image``: HWC uint8 RGB; ``label``: HW int64 (0 = background, ``k`` = ``names[k - 1]``,
    the dataset's ``ignore`` value for unlabelled pixels)."""

    id: str
    image: np.ndarray
    label: np.ndarray


class BenchmarkDataset(Protocol):
    """A benchmark split: ``names`` (K class names, 1-based in labels), ``ignore``,
    ``variants`` (metrics key -> whether background is scored), ``len()`` and iteration."""

    name: str
    names: list[str]
    ignore: int
    variants: dict[str, bool]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sample]: ...


BENCHMARKS = ("voc", "context", "coco_object", "lvis")


def require(root: Path, parts: list[str], key: str, layout: str) -> None:
    """DataError naming ``key`` and the expected ``layout`` unless every ``root/part`` exists."""
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise DataError(
            f"evaluate.{key}.root: {root} does not hold {missing[0]} (expected layout: {layout})"
        )


def open_benchmark(name: str, root: str | Path | None, limit: int | None = None):
    """The reader of benchmark ``name`` (one of :data:`BENCHMARKS`) on the data at ``root``;
    ``limit``: first ``limit`` images only."""
    from magicseg.datasets.coco import CocoSemantic
    from magicseg.datasets.pascal import ContextDataset, VOCDataset

    readers: dict[str, Callable] = {
        "voc": VOCDataset,
        "context": ContextDataset,
        "coco_object": CocoSemantic.coco_object,
        "lvis": CocoSemantic.lvis,
    }
    if name not in readers:
        raise DataError(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    if not root:
        raise DataError(f"evaluate.{name}.root: not set (the benchmark is enabled)")
    return readers[name](Path(root).expanduser(), limit=limit)


__all__ = ["BENCHMARKS", "BenchmarkDataset", "Sample", "open_benchmark", "require"]
