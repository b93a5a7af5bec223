"""Export the kept dataset (the ``filter`` stage's output) to COCO JSON with RLE masks.

One COCO image per kept sample (the positive image), one annotation per class present in its
mask: ``segmentation`` is the class's pixels as compressed RLE (``counts`` a UTF-8 string),
``bbox`` XYWH and ``area`` in pixels, ``iscrowd`` 0. Category ids are vocabulary indices
(1-based). Ignore pixels are left out (no category). ``file_name`` is relative to the JSON
file's directory. Needs ``pycocotools`` (the ``coco`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import ignore_index, read_manifest, read_mask, write_json
from magicseg.core.stage import load_vocabulary


def mask_annotations(mask: np.ndarray, image_id: int, first_id: int, ignore: int) -> list[dict]:
    """COCO annotations (RLE) for each class present in an HW class-index mask."""
    from pycocotools import mask as mask_utils

    out = []
    for cid in np.unique(mask):
        if cid == 0 or cid == ignore:
            continue
        binary = np.asfortranarray((mask == cid).astype(np.uint8))
        rle = mask_utils.encode(binary)
        out.append(
            {
                "id": first_id + len(out),
                "image_id": image_id,
                "category_id": int(cid),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return out


def export_coco(filter_dir: str | Path, vocab_dir: str | Path, out_json: str | Path) -> dict:
    """Write the kept samples of ``filter_dir`` as a COCO JSON file; returns its counts
    (images, annotations, categories)."""
    # 1. Inputs, checked before work.
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise BackendError(
            "export --format coco needs pycocotools: pip install 'magicseg[coco]'"
        ) from None
    filter_dir, out_json = Path(filter_dir), Path(out_json)
    frame = read_manifest(filter_dir)
    vocab = load_vocabulary(vocab_dir)
    ignore = ignore_index(len(vocab))
    rel = os.path.relpath(filter_dir, out_json.parent)

    # 2. Images and annotations.
    images, annotations = [], []
    for image_id, row in enumerate(frame.itertuples(index=False), start=1):
        mask = read_mask(filter_dir / row.mask)
        unknown = set(np.unique(mask).tolist()) - {ignore} - set(range(len(vocab) + 1))
        if unknown:
            raise DataError(f"{row.mask}: class {min(unknown)} is not in the vocabulary")
        h, w = mask.shape
        images.append(
            {
                "id": image_id,
                "file_name": os.path.normpath(f"{rel}/{row.image}"),
                "height": int(h),
                "width": int(w),
                "magicseg_id": row.id,
            }
        )
        annotations += mask_annotations(mask, image_id, len(annotations) + 1, ignore)

    # 3. Categories and the file.
    categories = [
        {"id": i, "name": name, "supercategory": "object"}
        for i, name in enumerate(vocab.names, start=1)
    ]
    coco = {
        "info": {"description": "magicseg synthetic dataset (kept samples)", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    write_json(out_json, coco)
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
