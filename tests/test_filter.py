import json
import math

import numpy as np
import pandas as pd
import pytest
from tests.helpers import make_dataset

from magicseg.core.config import FilterParams
from magicseg.core.io import (
    ignore_index,
    read_image,
    read_manifest,
    read_mask,
    write_image,
    write_manifest,
    write_mask,
)
from magicseg.core.vocabulary import build_vocabulary
from magicseg.filter import REASONS, keeps, reasons_for, run_filter, write_filter_gallery
from magicseg.viz import IGNORE_GREY, palette


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
    vocab, _ = make_dataset(tmp_path, requests=8, per_request=3, drift=0.6)
    params = FilterParams(max_components=1, gallery_samples=3)
    kept = run_filter(
        tmp_path / "label",
        tmp_path / "filter",
        params,
        tmp_path / "f.json",
        tmp_path / "g.png",
        vocab=vocab,
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


def test_gallery_greys_the_ignore_value_of_a_uint16_vocabulary(tmp_path):
    """LVIS (1203 classes) masks are uint16 with ignore 65535: grey in the overlay, and class
    1000 in its palette colour (a 255-ignore palette would miss both)."""
    vocab = build_vocabulary("lvis")
    ignore = ignore_index(len(vocab))
    assert ignore == 65535
    image = np.full((16, 16, 3), 200, np.uint8)
    mask = np.zeros((16, 16), np.int64)
    mask[:4] = ignore
    mask[8:] = 1000
    write_image(tmp_path / "images/a.png", image)
    write_image(tmp_path / "cf/a.png", image)
    write_mask(tmp_path / "masks/a.png", mask, len(vocab))
    frame = pd.DataFrame(
        [{"id": "a", "image": "images/a.png", "cf_image": "cf/a.png", "mask": "masks/a.png"}]
    )
    decisions = pd.DataFrame([{"id": "a", "kept": True, "reason": None, "reasons": []}])
    write_filter_gallery(tmp_path, frame, decisions, vocab, 1, tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    tile = 128  # 16 px enlarged 8x; third tile = the overlay, after two tiles and the padding
    x0 = 2 + 2 * (tile + 2)
    overlay = g[2 : 2 + tile, x0 : x0 + tile]
    grey = round(0.45 * 200 + 0.55 * IGNORE_GREY)
    assert (overlay[:32] == grey).all()
    want = np.rint(0.45 * 200 + 0.55 * palette(len(vocab))[1000].astype(float))
    assert (overlay[64:] == want).all()
    assert (overlay[40:56] == 200).all()  # background untouched


def test_filter_off_keeps_every_sample_with_a_mask_and_flags_the_rest(tmp_path):
    vocab, _ = make_dataset(tmp_path, requests=8, per_request=3, drift=0.6)
    frame = read_manifest(tmp_path / "label")
    frame.loc[3, "mask"] = None  # an unreadable pair: no mask to train on
    write_manifest(tmp_path / "label", frame)
    on = FilterParams(max_components=1, gallery_samples=0)
    off = on.model_copy(update={"enabled": False})
    run_filter(tmp_path / "label", tmp_path / "on", on, tmp_path / "on.json")
    kept = run_filter(tmp_path / "label", tmp_path / "off", off, tmp_path / "off.json")
    m_on, m_off = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("on", "off"))
    assert m_on["kept"] < 23  # the same data has samples the filter drops
    assert m_off["kept"] == len(kept) == 23 and kept["id"].tolist() == [
        i for i in frame["id"] if i != frame["id"][3]
    ]
    assert m_off["dropped"] == {r: int(r == "unreadable") for r in REASONS}
    assert m_off["flagged"] == m_on["flagged"] and sum(m_off["flagged"].values()) > 1
    assert keeps(["area_too_large"], off) and not keeps(["area_too_large"], on)
    assert not keeps(["no_detection", "empty_mask"], off) and keeps([], on)
