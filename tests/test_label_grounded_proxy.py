"""The offline Grounded-SAM stand-in: labels from the positive alone, with its kinds of errors."""

import numpy as np
import pytest
from tests.helpers import make_dataset

from magicseg.core.catalogue import CATALOGUE
from magicseg.core.config import (
    FilterParams,
    GroundedProxyParams,
    LabelParams,
    ProceduralGeneratorParams,
)
from magicseg.core.errors import BackendError
from magicseg.core.io import read_manifest
from magicseg.filter import reasons_for, run_filter
from magicseg.generate.base import PromptRecord
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label import build_labeler, class_iou, run_label
from magicseg.label.base import LabelInput
from magicseg.label.grounded_proxy import GroundedProxyLabeler, word_overlap
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.counterfactual import make_counterfactual
from magicseg.prompts.template import TemplateWriter

NO_ERRORS = GroundedProxyParams(bleed=0.0, miss=0.0, clutter=0.0, confusion=0.0)


def pairs(n, style="rich", seed=0, two=0.3):
    """``n`` LabelInputs (with oracle masks) of template prompts over the catalogue."""
    rng = np.random.default_rng(seed)
    writer = TemplateWriter(style)
    gen = ProceduralGenerator(ProceduralGeneratorParams(), 64, 64)
    out = []
    for i in range(n):
        idx = rng.choice(len(CATALOGUE), 2 if rng.random() < two else 1, replace=False)
        names = tuple(CATALOGUE[j].name for j in idx)
        ids = tuple(int(j) + 1 for j in idx)
        [[prompt]] = writer.write([PromptRequest(names, 1, int(rng.integers(2**31)))])
        rec = PromptRecord(
            f"t{seed}-{i:03d}",
            prompt,
            make_counterfactual(prompt, names),
            ids,
            names,
            int(rng.integers(2**31)),
        )
        pair = gen.render(rec)
        out.append(
            LabelInput(rec.id, pair.positive, pair.counterfactual, ids, names, pair.oracle_mask)
        )
    return out


@pytest.fixture(scope="module")
def rich():
    return pairs(40)


def masks(params, items):
    return [r.mask for r in GroundedProxyLabeler(params).label(items, 255)]


def miou(params, items):
    res = GroundedProxyLabeler(params).label(items, 255)
    return float(
        np.mean(
            [
                class_iou(r.mask, it.oracle_mask, it.class_ids)
                for r, it in zip(res, items, strict=True)
            ]
        )
    )


def test_default_is_the_offline_labeler_and_difference_stays_selectable():
    assert LabelParams().backend == "grounded_proxy"
    assert build_labeler(LabelParams()).name == "grounded_proxy"
    assert build_labeler(LabelParams(backend="difference")).name == "difference"


def test_oracle_miou_band_and_errors_cost_it(rich):
    clean, default = miou(NO_ERRORS, rich), miou(GroundedProxyParams(), rich)
    assert clean > 0.75  # perception alone is good: the errors make the labels Grounded-SAM-like
    assert 0.45 < default < 0.75
    assert default < clean - 0.1


def test_sees_the_positive_alone(rich):
    # the masks do not change when the counterfactual is replaced by anything else
    noise = np.random.default_rng(0).integers(0, 256, rich[0].positive.shape, dtype=np.uint8)
    swapped = [
        LabelInput(it.id, it.positive, noise, it.class_ids, it.class_names, None) for it in rich
    ]
    for a, b in zip(
        masks(GroundedProxyParams(), rich), masks(GroundedProxyParams(), swapped), strict=True
    ):
        assert np.array_equal(a, b)


def test_bleed_grows_masks_into_the_background(rich):
    clean = masks(NO_ERRORS, rich)
    bled = masks(NO_ERRORS.model_copy(update={"bleed": 1.0}), rich)
    grew = 0
    for c, b, it in zip(clean, bled, rich, strict=True):
        assert ((c > 0) <= (b > 0)).all()  # only added pixels
        added = (b > 0) & ~(c > 0)
        grew += added.sum() > 0
        # what is added is mostly background
        if added.sum() > 20:
            assert (it.oracle_mask[added] == 0).mean() > 0.5
    assert grew > 0.8 * sum(c.any() for c in clean)


def test_miss_cuts_parts_off(rich):
    clean = masks(NO_ERRORS, rich)
    cut = masks(NO_ERRORS.model_copy(update={"miss": 1.0, "miss_share": 0.5}), rich)
    shares = []
    for c, m in zip(clean, cut, strict=True):
        if c.any():
            assert ((m > 0) <= (c > 0)).all()  # only removed pixels
            shares.append(1 - (m > 0).sum() / (c > 0).sum())
    assert 0.1 < np.mean(shares) < 0.5 and min(shares) > 0.0


def test_clutter_adds_a_false_detection_outside_the_objects(rich):
    lab = GroundedProxyLabeler(NO_ERRORS.model_copy(update={"clutter": 1.0}))
    clean = masks(NO_ERRORS, rich)
    res = lab.label(rich, 255)
    with_false = [r for r in res if r.meta["false_detections"] == 1]
    assert len(with_false) > 0.8 * len(rich)
    for r, c, it in zip(res, clean, rich, strict=True):
        added = (r.mask > 0) & ~(c > 0)
        if r.meta["false_detections"]:
            assert added.sum() >= 8 and set(np.unique(r.mask[added])) <= set(it.class_ids)
            assert (it.oracle_mask[added] == 0).mean() > 0.8  # clutter is not an object
    assert all(
        r.meta["false_detections"] == 0 for r in GroundedProxyLabeler(NO_ERRORS).label(rich, 255)
    )


def test_confusion_follows_the_words_the_names_share():
    assert word_overlap("red heart", "blue heart") == pytest.approx(1 / 3)
    assert word_overlap("red heart", "blue star") == 0.0
    gen = ProceduralGenerator(ProceduralGeneratorParams(), 64, 64)

    def swapped(names, confusion, n=60):
        ids = (5, 9)
        wrong = total = 0
        lab = GroundedProxyLabeler(NO_ERRORS.model_copy(update={"confusion": confusion}))
        for i in range(n):
            prompt = f"a photo of a {names[0]} and a {names[1]}"
            rec = PromptRecord(f"c{i}", prompt, "a photo of nothing", ids, names, 1000 + i)
            pair = gen.render(rec)
            item = LabelInput(rec.id, pair.positive, pair.counterfactual, ids, names)
            [res] = lab.label([item], 255)
            for cid in ids:
                obj = pair.oracle_mask == cid
                got = res.mask[obj]
                if (got > 0).mean() > 0.5:
                    total += 1
                    wrong += np.bincount(got[got > 0]).argmax() != cid
        return wrong / total

    assert swapped(("red heart", "blue heart"), 0.0) == 0.0
    assert swapped(("red heart", "blue star"), 1.0) == 0.0  # nothing in common: never confused
    assert 0.15 < swapped(("red heart", "blue heart"), 1.0) < 0.55  # about a third


def test_deterministic_per_sample_id_not_order(rich):
    lab = GroundedProxyLabeler(GroundedProxyParams())
    forward = lab.label(rich, 255)
    backward = lab.label(rich[::-1], 255)[::-1]
    one_by_one = [lab.label([it], 255)[0] for it in rich]
    for a, b, c in zip(forward, backward, one_by_one, strict=True):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)
        assert a.detections == b.detections and a.cf_detected == c.cf_detected
    # the errors are drawn from the id (and label.grounded_proxy.seed)
    renamed = [
        LabelInput(it.id + "x", it.positive, it.counterfactual, it.class_ids, it.class_names)
        for it in rich
    ]
    other_seed = GroundedProxyLabeler(GroundedProxyParams(seed=1)).label(rich, 255)
    for other in (lab.label(renamed, 255), other_seed):
        assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(forward, other, strict=True))


def test_classes_without_a_colour_word_are_refused():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(BackendError, match="grounded_proxy.*'owl'"):
        GroundedProxyLabeler(GroundedProxyParams()).label(
            [LabelInput("x", img, img, (1,), ("owl",))], 255
        )


def test_counterfactual_check_catches_clutter_in_a_kept_scene_not_in_a_void():
    # a false detection on clutter is found again in a rich counterfactual (the clutter is still
    # there), never in a plain prompt's void; the objects themselves are gone from both
    params = NO_ERRORS.model_copy(update={"clutter": 1.0})
    lab = GroundedProxyLabeler(params)
    rich_items, plain_items = (
        pairs(30, "rich", seed=3, two=0.0),
        pairs(30, "plain", seed=4, two=0.0),
    )
    rich_res, plain_res = lab.label(rich_items, 255), lab.label(plain_items, 255)
    caught = [any(r.cf_detected) for r in rich_res if r.meta["false_detections"]]
    assert np.mean(caught) > 0.5
    assert not any(any(r.cf_detected) for r in plain_res)
    clean = GroundedProxyLabeler(NO_ERRORS).label(rich_items, 255)
    assert np.mean([any(r.cf_detected) for r in clean]) < 0.2
    # the filter reads the flags: cf_detected is a reason to drop
    for r in rich_res:
        row = {
            "mask": "m.png",
            "areas": [0.1],
            "components": [1],
            "ignore_frac": 0.0,
            "box_scores": [d["score"] for d in r.detections],
            "scores": r.scores,
            "cf_detected": r.cf_detected,
            "cf_agreement": r.cf_agreement,
        }
        assert ("cf_detected" in reasons_for(row, FilterParams())) == any(r.cf_detected)
        assert 0.0 <= r.cf_agreement <= 1.0


def test_label_and_filter_stages_with_the_proxy(tmp_path):
    vocab, p = make_dataset(tmp_path, requests=6, per_request=2)
    assert p.label.backend == "grounded_proxy"
    frame = read_manifest(tmp_path / "label")
    assert (frame["backend"] == "grounded_proxy").all()
    assert frame["cf_detected"].map(len).eq(frame["class_ids"].map(len)).all()
    assert frame["box_scores"].notna().all() and frame["oracle_iou"].notna().all()
    # with clutter on every image, the filter's counterfactual check drops some samples
    noisy = p.label.model_copy(
        update={"grounded_proxy": p.label.grounded_proxy.model_copy(update={"clutter": 1.0})}
    )
    cache = tmp_path / "cache"
    run_label(tmp_path / "generate", tmp_path / "noisy", noisy, len(vocab), cache_dir=cache)
    # the counterfactual check reads the difference params: a change there is a new cache key
    stricter = noisy.model_copy(
        update={"difference": noisy.difference.model_copy(update={"threshold": 0.3})}
    )
    run_label(tmp_path / "generate", tmp_path / "strict", stricter, len(vocab), cache_dir=cache)
    agreement = [read_manifest(tmp_path / d)["cf_agreement"] for d in ("noisy", "strict")]
    assert not np.allclose(agreement[0], agreement[1])
    run_filter(tmp_path / "noisy", tmp_path / "filtered", p.filter)
    decisions = read_manifest(tmp_path / "filtered", name="decisions.parquet")
    assert any("cf_detected" in r for r in decisions["reasons"])
