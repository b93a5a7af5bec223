"""Every filter reason, on constructed label-manifest rows and on rows built from constructed
Grounded-SAM detections; metrics/filter.json counts each reason."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from magicseg.core.config import FilterParams
from magicseg.core.io import write_manifest
from magicseg.filter import REASONS, reasons_for, run_filter
from magicseg.label import _row
from magicseg.label.base import LabelResult
from magicseg.label.grounded_sam import Detection, class_scores, compose_mask

PARAMS = FilterParams(min_score=0.35, min_cf_agreement=0.5, drop_cf_detected=True)


def row(**kw) -> dict:
    """A label-manifest row that passes every check; ``kw`` overrides columns."""
    base = {
        "id": "s",
        "image": "images/s.png",
        "cf_image": "cf/s.png",
        "mask": "masks/s.png",
        "class_ids": [3, 7],
        "areas": [0.1, 0.05],
        "components": [1, 2],
        "ignore_frac": 0.0,
        "scores": [0.9, 0.6],
        "cf_detected": [False, False],
        "cf_agreement": 0.8,
        "boxes": [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0]],
        "box_classes": [3, 7],
        "box_scores": [0.9, 0.6],
        "oracle_iou": float("nan"),
    }
    base.update(kw)
    return base


CASES = {
    "unreadable": {"mask": None},
    "no_detection": {
        "areas": [0.0, 0.0],
        "scores": [0.0, 0.0],
        "boxes": [],
        "box_classes": [],
        "box_scores": [],
    },
    "empty_mask": {"areas": [0.0, 0.0]},
    "missing_class": {"areas": [0.1, 0.0]},
    "area_too_small": {"areas": [0.002, 0.002]},
    "area_too_large": {"areas": [0.5, 0.3]},
    "too_many_components": {"components": [1, 4]},
    "too_much_ignore": {"ignore_frac": 0.2},
    "low_score": {"scores": [0.9, 0.3]},
    "cf_detected": {"cf_detected": [False, True]},
    "low_cf_agreement": {"cf_agreement": 0.3},
}


def test_the_clean_row_is_kept():
    assert reasons_for(row(), PARAMS) == []


@pytest.mark.parametrize("reason", list(CASES))
def test_each_reason_alone(reason):
    got = reasons_for(row(**CASES[reason]), PARAMS)
    assert got[0] == reason
    if reason not in ("no_detection", "empty_mask"):  # an empty mask is also small/low-scored
        assert got == [reason]


def test_every_reason_has_a_case():
    assert set(CASES) == set(REASONS)


def test_no_detection_is_not_empty_mask():
    assert "empty_mask" not in reasons_for(row(**CASES["no_detection"]), PARAMS)
    # boxes were found but their masks came out empty
    assert reasons_for(row(areas=[0.0, 0.0]), PARAMS) == ["empty_mask"]
    # labelers that do not detect (no box columns) never report no_detection
    assert reasons_for(row(areas=[0.0, 0.0], box_scores=None), PARAMS) == ["empty_mask"]


def test_switched_off_checks():
    off = FilterParams(min_score=0.0, min_cf_agreement=0.0, drop_cf_detected=False)
    assert (
        reasons_for(row(scores=[0.01, 0.01], cf_detected=[True, True], cf_agreement=0.0), off) == []
    )
    assert reasons_for(row(cf_agreement=float("nan")), PARAMS) == []  # not checked


# --------------------------------------------------------------------------------------------
# from constructed detections through the label stage's row builder
# --------------------------------------------------------------------------------------------
class _Gen:
    """The generate-manifest fields ``_row`` reads."""

    def __init__(self, i: int):
        self.id, self.prompt, self.image, self.cf_image = f"s{i}", "p", "i.png", "c.png"
        self.class_ids, self.class_names = [3, 7], ["school bus", "owl"]


def _result(dets: list[Detection], masks: np.ndarray, cf_found: set[int], agree: float):
    mask = (
        compose_mask(masks, [d.class_id for d in dets], [d.score for d in dets])
        if dets
        else np.zeros((20, 20), np.int64)
    )
    return LabelResult(
        mask=mask,
        scores=class_scores(dets, [3, 7]),
        cf_detected=[c in cf_found for c in (3, 7)],
        cf_agreement=agree,
        detections=[{"class_id": d.class_id, "score": d.score, "box": list(d.box)} for d in dets],
    )


def _blob(r0, r1, c0, c1):
    m = np.zeros((20, 20), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_reasons_from_constructed_detections(tmp_path):
    bus, owl = (
        Detection(3, 0.9, (0, 0, 8, 8)),
        Detection(7, 0.8, (10, 10, 18, 18)),
    )
    weak_owl = Detection(7, 0.31, (10, 10, 18, 18))
    two = np.stack([_blob(0, 8, 0, 8), _blob(10, 18, 10, 18)])
    cases = {
        "kept": _result([bus, owl], two, set(), 0.9),
        "no_detection": _result([], np.zeros((0, 20, 20), bool), set(), 1.0),
        "empty_mask": _result([bus, owl], np.zeros((2, 20, 20), bool), set(), 1.0),
        "missing_class": _result([bus], two[:1], set(), 0.9),
        "area_too_large": _result(
            [bus, owl], np.stack([_blob(0, 14, 0, 20), _blob(15, 20, 10, 18)]), set(), 0.9
        ),
        "low_score": _result([bus, weak_owl], two, set(), 0.9),
        "cf_detected": _result([bus, owl], two, {7}, 0.9),
        "low_cf_agreement": _result([bus, owl], two, set(), 0.2),
    }
    rows = [
        _row(_Gen(i), "..", None, res, {}, "grounded_sam", 255)
        for i, res in enumerate(cases.values())
    ]
    frame = pd.DataFrame(rows)
    first = [(reasons_for(r, PARAMS) or ["kept"])[0] for _, r in frame.iterrows()]
    assert first == list(cases)

    # through parquet and the stage: metrics count each reason
    label_dir = tmp_path / "label"
    write_manifest(label_dir, frame)
    run_filter(label_dir, tmp_path / "filter", PARAMS, metrics_path=tmp_path / "filter.json")
    metrics = json.loads((tmp_path / "filter.json").read_text())
    assert metrics["kept"] == 1
    for reason in REASONS:
        assert metrics["dropped"][reason] == int(reason in cases), reason
    decisions = pd.read_parquet(tmp_path / "filter" / "decisions.parquet")
    assert decisions["reason"].fillna("kept").tolist() == list(cases)

    # the filter off: the same flags, every sample with a mask kept (no detection: no mask)
    off = PARAMS.model_copy(update={"enabled": False})
    run_filter(label_dir, tmp_path / "off", off, metrics_path=tmp_path / "off.json")
    off_metrics = json.loads((tmp_path / "off.json").read_text())
    off_decisions = pd.read_parquet(tmp_path / "off" / "decisions.parquet")
    assert off_decisions["kept"].tolist() == [c != "no_detection" for c in cases]
    assert [list(r) for r in off_decisions["reasons"]] == [list(r) for r in decisions["reasons"]]
    assert off_decisions["reason"].fillna("kept").tolist() == [
        "no_detection" if c == "no_detection" else "kept" for c in cases
    ]
    assert off_metrics["flagged"] == metrics["flagged"]
    assert off_metrics["kept"] == len(cases) - 1
    assert off_metrics["dropped"] == {r: int(r == "no_detection") for r in REASONS}
    kept = pd.read_parquet(tmp_path / "off" / "manifest.parquet")
    assert kept["id"].tolist() == [
        r["id"] for r, c in zip(rows, cases, strict=True) if c != "no_detection"
    ]
