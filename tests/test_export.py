"""COCO export of the kept dataset: masks round-trip through pycocotools."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from magicseg.core.config import FilterParams
from magicseg.core.errors import DataError
from magicseg.core.io import write_image, write_manifest, write_mask
from magicseg.core.vocabulary import Vocabulary
from magicseg.export import export_coco
from magicseg.filter import run_filter

pytest.importorskip("pycocotools")


def _dataset(tmp_path):
    """A vocabulary of 3 classes and a label output of 3 samples, one of them dropped."""
    vocab_dir, label_dir = tmp_path / "vocabulary", tmp_path / "label"
    write_manifest(vocab_dir, Vocabulary(("cat", "dog", "owl")).to_frame())
    masks = []
    m = np.zeros((32, 48), np.int64)
    m[2:10, 3:20] = 1
    m[20:30, 30:40] = 3
    m[0, :] = 255  # ignore pixels are not exported
    masks.append(m)
    m = np.zeros((32, 48), np.int64)
    m[5:25, 5:25] = 2
    m[10:12, 40:44] = 2  # two pieces of one class: one annotation
    masks.append(m)
    masks.append(np.zeros((32, 48), np.int64))  # empty: dropped by the filter
    rows = []
    for i, mask in enumerate(masks):
        write_image(label_dir / f"img/{i}.png", np.full((32, 48, 3), 100, np.uint8))
        write_mask(label_dir / f"masks/{i}.png", mask, 3)
        ids = sorted({int(c) for c in np.unique(mask)} - {0, 255}) or [1]
        rows.append(
            {
                "id": f"s{i}",
                "image": f"img/{i}.png",
                "cf_image": f"img/{i}.png",
                "mask": f"masks/{i}.png",
                "class_ids": ids,
                "areas": [float((mask == c).mean()) for c in ids],
                "components": [1] * len(ids),
                "ignore_frac": 0.0,
                "oracle_iou": float("nan"),
            }
        )
    write_manifest(label_dir, pd.DataFrame(rows))
    params = FilterParams(max_components=3, min_area=0.001)
    run_filter(label_dir, tmp_path / "filter", params)
    return vocab_dir, tmp_path / "filter", masks


def test_export_round_trips_masks(tmp_path):
    from pycocotools.coco import COCO

    vocab_dir, filter_dir, masks = _dataset(tmp_path)
    out = tmp_path / "export" / "coco.json"
    counts = export_coco(filter_dir, vocab_dir, out)
    assert counts == {"images": 2, "annotations": 3, "categories": 3}

    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "owl"]
    for img in coco.loadImgs(coco.getImgIds()):
        assert (out.parent / img["file_name"]).is_file()
        mask = masks[int(img["magicseg_id"][1:])]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert sorted(a["category_id"] for a in anns) == sorted(
            {int(c) for c in np.unique(mask)} - {0, 255}
        )
        for ann in anns:
            decoded = coco.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(decoded, mask == ann["category_id"])
            assert ann["area"] == int((mask == ann["category_id"]).sum())
    ann = coco.loadAnns(coco.getAnnIds(catIds=[1]))[0]
    assert ann["bbox"] == [3.0, 2.0, 17.0, 8.0]  # XYWH
    assert len({a["id"] for a in coco.dataset["annotations"]}) == 3


def test_mask_class_outside_the_vocabulary(tmp_path):
    vocab_dir, filter_dir, _ = _dataset(tmp_path)
    write_manifest(vocab_dir, Vocabulary(("cat",)).to_frame())
    # the first kept mask holds classes 1, 3 and ignore pixels: 3 is unknown
    with pytest.raises(DataError, match="masks/0.png: class 3 is not in the vocabulary"):
        export_coco(filter_dir, vocab_dir, tmp_path / "coco.json")
