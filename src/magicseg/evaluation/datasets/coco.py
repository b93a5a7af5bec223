"""COCO-Object and LVIS v1 val: instance annotations rasterised to semantic labels.

Both read a COCO-format instances JSON through ``pycocotools`` (the ``lvis`` package is not
needed). Categories sorted by id are the classes 1..K, checked against the builtin names
(``vocabulary.COCO``: 80, ``resources/lvis_v1.txt``: 1203).

Rasterisation (:func:`rasterize`), one semantic HW map per image:

1. every pixel starts as background (0): pixels of no annotated object;
2. crowd regions (``iscrowd: 1``, COCO only) become ``ignore``: a crowd of people is neither a
   clean "person" region nor background;
3. non-crowd instances are painted in order of decreasing area, so where instances overlap the
   smaller one wins (it is usually the one in front; COCO's polygons of a large object often
   include its occluders); an instance painted over a crowd region takes those pixels.

LVIS is federated (each image is annotated exhaustively only for some categories); pixels of
no annotation count as background, as in the COCO-Object protocol.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import ignore_index, read_image
from magicseg.core.vocabulary import builtin_names, check_names, normalize_name
from magicseg.evaluation.datasets.base import Sample, require

COCO_LAYOUT = "COCO 2017 with annotations/instances_val2017.json and val2017/*.jpg"
LVIS_LAYOUT = (
    "COCO 2017 images (val2017/, train2017/) and lvis_v1_val.json in the root or in annotations/"
)


def rasterize(
    anns: Sequence[dict],
    height: int,
    width: int,
    class_of: dict[int, int],
    ignore: int,
    to_mask: Callable[[dict], np.ndarray],
) -> np.ndarray:
    """HW int64 semantic map from COCO annotation dicts (see the module docstring for the
    order); ``class_of``: category id -> class index (1-based); ``to_mask(ann)`` -> HW 0/1."""
    out = np.zeros((height, width), np.int64)
    for ann in anns:
        if ann.get("iscrowd", 0):
            out[to_mask(ann) > 0] = ignore
    solid = [a for a in anns if not a.get("iscrowd", 0)]
    for ann in sorted(solid, key=lambda a: -float(a.get("area", 0.0))):
        if ann["category_id"] not in class_of:
            raise DataError(f"annotation {ann.get('id')}: unknown category {ann['category_id']}")
        out[to_mask(ann) > 0] = class_of[ann["category_id"]]
    return out


def _coco_api(name: str):
    """pycocotools' COCO class; BackendError naming ``evaluate.<name>`` when it is missing."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise BackendError(
            f"evaluate.{name}: needs pycocotools (pip install 'magicseg[coco]')"
        ) from None
    return COCO


def coco_object_annotations(root: Path) -> Path:
    """The COCO-Object annotations file after checking the layout (nothing parsed)."""
    ann = "annotations/instances_val2017.json"
    require(root, [ann, "val2017"], "coco_object", COCO_LAYOUT)
    return root / ann


def lvis_annotations(root: Path) -> Path:
    """The LVIS v1 val annotations file (in ``root`` or ``root/annotations``) after checking
    the layout (nothing parsed)."""
    for ann in ("lvis_v1_val.json", "annotations/lvis_v1_val.json"):
        if (root / ann).is_file():
            break
    require(root, [ann], "lvis", LVIS_LAYOUT)
    return root / ann


def check_layout(name: str, root: Path) -> str:
    """What :class:`CocoSemantic` needs for ``name`` (coco_object or lvis) at ``root``, checked
    without parsing the annotations (pycocotools importable, the layout's files present):
    the annotations file's size in words, or a one-line error naming ``evaluate.<name>``."""
    _coco_api(name)
    ann = coco_object_annotations(root) if name == "coco_object" else lvis_annotations(root)
    size = ann.stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    return f"{ann.relative_to(root)} ({shown})"


class CocoSemantic:
    """A COCO-format instances file as a semantic segmentation dataset."""

    def __init__(
        self,
        annotations: Path,
        image_root: Path,
        vocabulary: str,
        name: str,
        limit: int | None = None,
    ) -> None:
        COCO = _coco_api(name)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            try:
                self.coco = COCO(str(annotations))
            except (OSError, ValueError, KeyError) as err:
                raise DataError(f"{annotations}: not a COCO instances file ({err})") from None
        self.name = name
        self.image_root = image_root
        self.names = check_names(builtin_names(vocabulary), vocabulary)
        self.ignore = ignore_index(len(self.names))
        self.variants = {name: True}
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if len(cats) != len(self.names):
            raise DataError(
                f"{annotations}: {len(cats)} categories, expected {len(self.names)} ({name})"
            )
        for i, (cat, want) in enumerate(zip(cats, self.names, strict=True)):
            if normalize_name(cat["name"]) != want:
                raise DataError(
                    f"{annotations}: category {cat['id']} is {cat['name']!r}, expected class "
                    f"{i + 1} {want!r}"
                )
        self.class_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
        ids = sorted(self.coco.getImgIds())
        self.ids = ids[:limit] if limit else ids

    @classmethod
    def coco_object(cls, root: Path, limit: int | None = None) -> CocoSemantic:
        """COCO-Object: COCO 2017 val instances, 80 classes + background (5000 images)."""
        return cls(coco_object_annotations(root), root, "coco", "coco_object", limit)

    @classmethod
    def lvis(cls, root: Path, limit: int | None = None) -> CocoSemantic:
        """LVIS v1 val: 1203 classes + background (19809 images from COCO 2017)."""
        return cls(lvis_annotations(root), root, "lvis", "lvis", limit)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, info: dict) -> Path:
        """COCO: ``val2017/<file_name>``; LVIS (no file_name): the last two parts of
        ``coco_url`` (``val2017/000000397133.jpg`` or ``train2017/...``)."""
        if "file_name" in info and self.name != "lvis":
            return self.image_root / "val2017" / info["file_name"]
        url = info.get("coco_url") or info.get("file_name", "")
        return self.image_root.joinpath(*url.split("/")[-2:])

    def __iter__(self) -> Iterator[Sample]:
        for img_id in self.ids:
            info = self.coco.loadImgs(img_id)[0]
            image = read_image(self.image_path(info))
            h, w = int(info["height"]), int(info["width"])
            if image.shape[:2] != (h, w):
                raise DataError(f"image {img_id}: {image.shape[:2]} != annotated {(h, w)}")
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=None))
            label = rasterize(anns, h, w, self.class_of, self.ignore, self.coco.annToMask)
            yield Sample(str(img_id), image, label)
