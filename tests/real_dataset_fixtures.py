"""Miniature real datasets in their standard layouts, written by tests (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from magicseg.evaluation.datasets.pascal import voc_palette

# the 80 COCO category ids (non-contiguous), in the order of vocabulary.COCO
COCO_IDS = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]


def _jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A dark noisy HWC uint8 image with a bright square in its middle third."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(30, 5, (h, w, 3)), 0, 255).astype(np.uint8)
    image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 230
    return image


def voc_labels(h: int, w: int, cls: int) -> np.ndarray:
    """Background, class ``cls`` on the bright square, a 255 border one pixel around it."""
    label = np.zeros((h, w), np.uint8)
    label[h // 3 - 1 : 2 * h // 3 + 1, w // 3 - 1 : 2 * w // 3 + 1] = 255
    label[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = cls
    return label


def make_voc(root: Path, classes=(12, 15, 1), size=(36, 48)) -> tuple[Path, list[np.ndarray]]:
    """``VOCdevkit/VOC2012`` with one image per class in ``classes`` (palette label PNGs)."""
    voc = root / "VOCdevkit" / "VOC2012"
    ids, labels = [], []
    pal = voc_palette().ravel().tolist()
    for i, cls in enumerate(classes):
        name = f"2007_{i:06d}"
        _jpeg(voc / "JPEGImages" / f"{name}.jpg", scene(*size, seed=i))
        label = voc_labels(*size, cls)
        png = Image.fromarray(label, mode="P")
        png.putpalette(pal)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(voc / "SegmentationClass" / f"{name}.png")
        ids.append(name)
        labels.append(label.astype(np.int64))
    split = voc / "ImageSets" / "Segmentation"
    split.mkdir(parents=True, exist_ok=True)
    (split / "val.txt").write_text("\n".join(ids) + "\n")
    return voc, labels


def make_context(root: Path, size=(30, 40)) -> tuple[Path, list[np.ndarray]]:
    """``VOCdevkit/VOC2010`` with two images, grey label PNGs 0..59 (mmseg's conversion)."""
    ctx = root / "VOCdevkit" / "VOC2010"
    labels = []
    for i, name in enumerate(["2008_000001", "2008_000002"]):
        _jpeg(ctx / "JPEGImages" / f"{name}.jpg", scene(*size, seed=10 + i))
        label = np.zeros(size, np.uint8)
        label[: size[0] // 2] = 47 if i == 0 else 59  # sky / wood
        label[size[0] // 2 :, : size[1] // 2] = 1  # aeroplane
        (ctx / "SegmentationClassContext").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(ctx / "SegmentationClassContext" / f"{name}.png")
        labels.append(label.astype(np.int64))
    split = ctx / "ImageSets" / "SegmentationContext"
    split.mkdir(parents=True, exist_ok=True)
    (split / "val.txt").write_text("2008_000001\n2008_000002\n")
    return ctx, labels


def rle(mask: np.ndarray) -> dict:
    """A boolean HW mask as COCO compressed RLE (JSON-ready)."""
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": enc["size"], "counts": enc["counts"].decode("ascii")}


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
