import json
import math

import pytest
from tests.helpers import make_dataset

from magicseg.config import FilterParams
from magicseg.filter import REASONS, reasons_for, run_filter
from magicseg.io import read_image, read_manifest, read_mask


def row(**kw):
    base = {
        "mask": "masks/a.png",
        "areas": [0.1],
        "components": [1],
        "ignore_frac": 0.0,
        "scores": None,
        "cf_detected": None,
        "cf_agreement": math.nan,
    }
    base.update(kw)
    return base


P = FilterParams(
    min_area=0.01,
    max_area=0.5,
    max_components=2,
    max_ignore=0.05,
    min_score=0.3,
    min_cf_agreement=0.4,
)


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"mask": None}, "unreadable"),
        ({"areas": [0.0]}, "empty_mask"),
        ({"areas": [0.1, 0.0], "components": [1, 0]}, "missing_class"),
        ({"areas": [0.005]}, "area_too_small"),
        ({"areas": [0.7]}, "area_too_large"),
        ({"components": [3]}, "too_many_components"),
        ({"ignore_frac": 0.2}, "too_much_ignore"),
        ({"scores": [0.2]}, "low_score"),
        ({"cf_detected": [True]}, "cf_detected"),
        ({"cf_agreement": 0.1}, "low_cf_agreement"),
    ],
)
def test_every_reason(kw, reason):
    assert reasons_for(row(**kw), P) == [reason]


def test_good_sample_kept_and_switches():
    assert reasons_for(row(scores=[0.9], cf_detected=[False], cf_agreement=0.8), P) == []
    off = P.model_copy(update={"drop_cf_detected": False, "min_cf_agreement": 0.0})
    assert reasons_for(row(cf_detected=[True], cf_agreement=0.0), off) == []
    assert set(reasons_for(row(areas=[0.7], components=[5]), P)) == {
        "area_too_large",
        "too_many_components",
    }
    assert len(REASONS) == 11


def test_filter_stage(tmp_path):
    make_dataset(tmp_path, requests=8, per_request=3, drift=0.6)
    params = FilterParams(max_components=1, gallery=3)
    kept = run_filter(
        tmp_path / "label", tmp_path / "filter", params, tmp_path / "f.json", tmp_path / "g.png"
    )
    dec = read_manifest(tmp_path / "filter", "decisions.parquet")
    metrics = json.loads((tmp_path / "f.json").read_text())
    assert metrics["samples"] == 24 == len(dec)
    assert metrics["kept"] == len(kept) == dec["kept"].sum()
    assert sum(metrics["dropped"].values()) == 24 - len(kept) > 0
    assert metrics["oracle_miou_kept"] > metrics["oracle_miou_dropped"]
    for r in kept.itertuples():  # paths re-rooted at the filter dir
        assert read_image(tmp_path / "filter" / r.image).shape == (64, 64, 3)
        assert read_mask(tmp_path / "filter" / r.mask).shape == (64, 64)
    g = read_image(tmp_path / "g.png")
    assert g.shape[0] > 6 * 128
