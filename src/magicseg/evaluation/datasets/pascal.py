"""PASCAL VOC 2012 val and PASCAL Context val, from their usual label PNGs.

- VOC: ``SegmentationClass/*.png`` are palette PNGs whose indices are the labels: 0 =
  background, 1..20 the VOC classes in the standard order (= ``vocabulary.VOC``), 255 = the
  object borders (ignored).
- Context: ``SegmentationClassContext/*.png`` as converted for mmsegmentation (the detail-API
  script): 0 = background, 1..59 the 59 frequent classes in the standard order
  (= ``vocabulary.CONTEXT59``); pixels of the other 400 classes are 0 there too. Two variants
  are scored from the same predictions: ``context`` (59 classes, background ignored, the usual
  "Context-59") and ``context60`` (background scored as a 60th class). With ``protocol:
  pc60_text`` (the published setting) "background" is the first of 60 *text* classes, encoded
  with the 15 ZegCLIP templates like the others, and every pixel is scored among the 60
  (``context60_text``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from magicseg.core.errors import DataError
from magicseg.core.io import IGNORE_U8, read_image, read_mask
from magicseg.core.vocabulary import builtin_names, check_names
from magicseg.evaluation.datasets.base import Sample, require


class _PascalSplit:
    """Ids from a split file; ``JPEGImages/<id>.jpg`` + ``<labels>/<id>.png``."""

    name = ""
    key = ""
    layout = ""
    split_file = ""
    label_dir = ""
    vocabulary = ""
    variants: dict[str, bool] = {}
    templates: tuple[str, ...] | None = None
    """Templates the names are encoded with instead of ``evaluate.templates`` (None: those)."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        root = Path(root)
        ids = self.check_layout(root)
        self.root = root
        self.ids = ids[:limit] if limit else ids
        self.names = check_names(builtin_names(self.vocabulary), self.vocabulary)
        self.label_classes = len(self.names)  # the label files' largest class index
        self.ignore = IGNORE_U8

    @classmethod
    def check_layout(cls, root: Path) -> list[str]:
        """The split's image ids, after checking the layout (no image read); DataError naming
        ``evaluate.<key>.root`` otherwise."""
        require(root, [cls.split_file, "JPEGImages", cls.label_dir], cls.key, cls.layout)
        ids = [s.strip() for s in (root / cls.split_file).read_text().splitlines() if s.strip()]
        if not ids:
            raise DataError(f"{root / cls.split_file}: no image ids")
        return ids

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in self.ids:
            image = read_image(self.root / "JPEGImages" / f"{i}.jpg")
            label = read_mask(self.root / self.label_dir / f"{i}.png")
            if label.shape != image.shape[:2]:
                raise DataError(f"{self.label_dir}/{i}.png: {label.shape} != image {image.shape}")
            bad = (label > self.label_classes) & (label != self.ignore)
            if bad.any():
                raise DataError(
                    f"{self.label_dir}/{i}.png: label {int(label[bad][0])} is not a class index "
                    f"(0..{self.label_classes} or {self.ignore})"
                )
            yield Sample(i, image, self.relabel(label))

    def relabel(self, label: np.ndarray) -> np.ndarray:
        """The file's labels in this reader's class indices (as read)."""
        return label


class VOCDataset(_PascalSplit):
    """PASCAL VOC 2012 val: 1449 images, 20 classes + background, 255 ignored."""

    name = key = "voc"
    layout = (
        "VOCdevkit/VOC2012 with ImageSets/Segmentation/val.txt, JPEGImages/*.jpg, "
        "SegmentationClass/*.png"
    )
    split_file = "ImageSets/Segmentation/val.txt"
    label_dir = "SegmentationClass"
    vocabulary = "voc"
    variants = {"voc": True, "voc20": False}


class ContextDataset(_PascalSplit):
    """PASCAL Context val (mmseg layout): 5105 images, 59 classes + background."""

    name = key = "context"
    layout = (
        "VOCdevkit/VOC2010 with ImageSets/SegmentationContext/val.txt, JPEGImages/*.jpg, "
        "SegmentationClassContext/*.png"
    )
    split_file = "ImageSets/SegmentationContext/val.txt"
    label_dir = "SegmentationClassContext"
    vocabulary = "context"
    variants = {"context": False, "context60": True}
    protocols = ("pc59", "pc60_text")

    def __init__(self, root: Path, limit: int | None = None, protocol: str = "pc59") -> None:
        super().__init__(root, limit)
        if protocol not in self.protocols:
            raise DataError(
                f"evaluate.context.protocol: unknown {protocol!r} (allowed: pc59, pc60_text)"
            )
        self.protocol = protocol
        if protocol == "pc60_text":
            from magicseg.core.templates import ZEGCLIP_TEMPLATES

            self.names = ["background", *self.names]
            self.variants = {"context60_text": False}
            self.templates = ZEGCLIP_TEMPLATES

    def relabel(self, label: np.ndarray) -> np.ndarray:
        """pc60_text: background (0) becomes text class 1, class ``k`` becomes ``k + 1``; no
        pixel is left as the model's background."""
        if self.protocol != "pc60_text":
            return label
        out = label.astype(np.int64) + 1
        out[label == self.ignore] = self.ignore
        return out


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, 256x3 uint8 (index -> RGB), as in the devkit."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
