"""Real-dataset readers on miniature datasets written in each standard layout."""

from __future__ import annotations

import numpy as np
import pytest
from tests.real_dataset_fixtures import (
    COCO_IDS,
    box_mask,
    make_context,
    make_voc,
    rle,
    scene,
    write_json,
)

from magicseg.core.config import EvaluateParams
from magicseg.core.errors import DataError
from magicseg.core.vocabulary import builtin_names
from magicseg.evaluation.datasets import open_real_dataset
from magicseg.evaluation.datasets.coco import rasterize
from magicseg.evaluation.real import open_enabled


# --------------------------------------------------------------------------------------------
# PASCAL VOC and Context
# --------------------------------------------------------------------------------------------
def test_voc_reads_palette_indices_and_keeps_ignore(tmp_path):
    voc, labels = make_voc(tmp_path, classes=(12, 15, 20))
    ds = open_real_dataset("voc", voc)
    assert len(ds) == 3 and len(ds.names) == 20 and ds.ignore == 255
    assert ds.names[12 - 1] == "dog" and ds.names[15 - 1] == "person"
    assert ds.variants == {"voc": True, "voc20": False}
    samples = list(ds)
    for s, want in zip(samples, labels, strict=True):
        assert s.image.shape == (36, 48, 3) and s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.label, want)  # indices, not palette colours
    assert set(np.unique(samples[2].label)) == {0, 20, 255}
    assert len(list(open_real_dataset("voc", voc, limit=2))) == 2


def test_voc_label_out_of_range_is_a_data_error(tmp_path):
    from PIL import Image

    voc, _ = make_voc(tmp_path, classes=(3,))
    Image.fromarray(np.full((36, 48), 40, np.uint8)).save(
        voc / "SegmentationClass" / "2007_000000.png"
    )
    with pytest.raises(DataError, match="label 40 is not a class index"):
        list(open_real_dataset("voc", voc))


def test_context_labels_and_variants(tmp_path):
    ctx, labels = make_context(tmp_path)
    ds = open_real_dataset("context", ctx)
    assert len(ds.names) == 59 and ds.names[47 - 1] == "sky" and ds.names[59 - 1] == "wood"
    assert ds.variants == {"context": False, "context60": True}
    for s, want in zip(ds, labels, strict=True):
        np.testing.assert_array_equal(s.label, want)


# --------------------------------------------------------------------------------------------
# COCO-Object and LVIS
# --------------------------------------------------------------------------------------------
H, W = 40, 50


def _coco(root, extra_categories=()):
    """Two images: #1 with overlapping instances, a crowd region and a polygon; #2 empty."""
    cats = [
        {"id": i, "name": n} for i, n in zip(COCO_IDS, builtin_names("coco"), strict=True)
    ] + list(extra_categories)
    person = box_mask(H, W, 0, 30, 0, 40)
    dog = box_mask(H, W, 10, 20, 10, 20)
    crowd = box_mask(H, W, 25, 40, 30, 50)
    brush = box_mask(H, W, 32, 38, 40, 46)
    anns = [  # the small dog comes first: annotation order must not decide overlaps
        {"id": 1, "image_id": 1, "category_id": 18, "segmentation": rle(dog), "area": 100.0,
         "iscrowd": 0, "bbox": [10, 10, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle(person), "area": 1200.0,
         "iscrowd": 0, "bbox": [0, 0, 40, 30]},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": rle(crowd), "area": 300.0,
         "iscrowd": 1, "bbox": [30, 25, 20, 15]},
        {"id": 4, "image_id": 1, "category_id": 90, "segmentation": rle(brush), "area": 36.0,
         "iscrowd": 0, "bbox": [40, 32, 6, 6]},
        {"id": 5, "image_id": 1, "category_id": 3, "segmentation": [[0, 32, 10, 32, 10, 40, 0, 40]],
         "area": 80.0, "iscrowd": 0, "bbox": [0, 32, 10, 8]},
    ]  # fmt: skip
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "000000000002.jpg", "height": H, "width": W},
    ]
    for im in images:
        from PIL import Image

        path = root / "val2017" / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(H, W, im["id"])).save(path)
    data = {"images": images, "annotations": anns, "categories": cats}
    write_json(root / "annotations" / "instances_val2017.json", data)
    expected = np.zeros((H, W), np.int64)
    expected[crowd] = 255
    expected[person] = 1
    expected[dog] = 17  # COCO id 18 is the 17th category
    expected[brush] = 80  # COCO id 90 (toothbrush), painted over the crowd region
    return expected


def test_coco_instances_rasterise_to_the_semantic_map(tmp_path):
    expected = _coco(tmp_path)
    ds = open_real_dataset("coco_object", tmp_path)
    assert len(ds) == 2 and ds.ignore == 255 and ds.variants == {"coco_object": True}
    first, second = list(ds)
    car_box = (slice(31, 41), slice(0, 11))  # the polygon: exact edges are pycocotools' call
    assert (first.label[33:39, 1:9] == 3).all()
    outside = np.ones((H, W), bool)
    outside[car_box] = False
    np.testing.assert_array_equal(first.label[outside], expected[outside])
    # smaller instance wins an overlap; crowd -> ignore unless an instance covers it
    assert first.label[15, 15] == 17 and first.label[5, 5] == 1
    assert first.label[39, 49] == 255 and first.label[27, 35] == 1 and first.label[35, 42] == 80
    assert (second.label == 0).all()
    assert first.image.shape == (H, W, 3)


def test_coco_wrong_categories_are_a_data_error(tmp_path):
    _coco(tmp_path, extra_categories=[{"id": 91, "name": "banner"}])
    with pytest.raises(DataError, match="81 categories, expected 80"):
        open_real_dataset("coco_object", tmp_path)


def test_rasterize_rejects_an_unknown_category():
    ann = {"id": 7, "category_id": 5, "area": 1.0, "iscrowd": 0}
    with pytest.raises(DataError, match="unknown category 5"):
        rasterize([ann], 2, 2, {1: 1}, 255, lambda a: np.ones((2, 2), np.uint8))


def test_lvis_1203_classes_from_coco_images(tmp_path):
    from PIL import Image

    names = builtin_names("lvis")
    cats = [{"id": i + 1, "name": n.replace(" ", "_")} for i, n in enumerate(names)]
    h, w = 24, 32
    info = {"id": 5, "height": h, "width": w,
            "coco_url": "http://images.cocodataset.org/train2017/000000000005.jpg"}  # fmt: skip
    (tmp_path / "train2017").mkdir()
    Image.fromarray(scene(h, w, 5)).save(tmp_path / "train2017" / "000000000005.jpg")
    big, small = box_mask(h, w, 0, 12, 0, 16), box_mask(h, w, 4, 8, 4, 8)
    anns = [  # LVIS has no iscrowd field
        {"id": 1, "image_id": 5, "category_id": 1203, "segmentation": rle(small), "area": 16.0},
        {"id": 2, "image_id": 5, "category_id": 2, "segmentation": rle(big), "area": 192.0},
    ]
    write_json(tmp_path / "annotations" / "lvis_v1_val.json",
               {"images": [info], "annotations": anns, "categories": cats})  # fmt: skip
    ds = open_real_dataset("lvis", tmp_path)
    assert len(ds.names) == 1203 and ds.ignore == 65535
    (s,) = list(ds)
    expected = np.zeros((h, w), np.int64)
    expected[big] = 2
    expected[small] = 1203
    np.testing.assert_array_equal(s.label, expected)


# --------------------------------------------------------------------------------------------
# Missing paths and switched-off datasets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("voc", "VOCdevkit/VOC2012 with ImageSets/Segmentation/val.txt"),
        ("context", "VOCdevkit/VOC2010 with ImageSets/SegmentationContext/val.txt"),
        ("coco_object", "annotations/instances_val2017.json and val2017/"),
        ("lvis", "lvis_v1_val.json"),
    ],
)
def test_missing_path_is_one_line_naming_the_layout(tmp_path, name, layout):
    with pytest.raises(DataError) as err:
        open_real_dataset(name, tmp_path / "nowhere")
    msg = str(err.value)
    assert msg.startswith(f"evaluate.{name}.root: {tmp_path / 'nowhere'} does not hold")
    assert layout in msg and "\n" not in msg


def test_enabled_dataset_without_root_and_disabled_ones(tmp_path):
    with pytest.raises(DataError, match=r"evaluate\.voc\.root: not set"):
        open_enabled(EvaluateParams(voc={"enabled": True}))
    # switched off: a wrong path is never looked at
    off = EvaluateParams(voc={"enabled": False, "root": str(tmp_path / "nowhere")})
    assert open_enabled(off) == {}
    voc, _ = make_voc(tmp_path)
    on = open_enabled(EvaluateParams(voc={"enabled": True, "root": str(voc), "limit": 1}))
    assert list(on) == ["voc"] and len(on["voc"]) == 1
