from itertools import combinations

import numpy as np
import pytest
from tests.helpers import make_dataset

from magicseg.core.catalogue import BY_NAME, COLOURS, SHAPES
from magicseg.core.config import DifferenceLabelerParams, ProceduralGeneratorParams
from magicseg.core.io import (
    IGNORE_U8,
    IGNORE_U16,
    ignore_index,
    mask_dtype,
    read_manifest,
    read_mask,
    write_mask,
)
from magicseg.generate.base import PromptRecord
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label import class_iou, mask_stats
from magicseg.label.base import LabelInput
from magicseg.label.difference import DifferenceLabeler, assign_classes


@pytest.mark.parametrize(
    "k, dtype, ignore",
    [
        (20, np.uint8, IGNORE_U8),
        (254, np.uint8, 255),
        (255, np.uint16, IGNORE_U16),
        (1203, np.uint16, 65535),
    ],
)
def test_mask_encoding_round_trip(tmp_path, k, dtype, ignore):
    assert mask_dtype(k) == dtype and ignore_index(k) == ignore
    m = np.zeros((8, 9), np.int64)
    m[1, 2], m[3, 4], m[5, 6] = k, 1, ignore
    write_mask(tmp_path / "m.png", m, k)
    back = read_mask(tmp_path / "m.png")
    assert np.array_equal(back, m)
    with pytest.raises(ValueError):
        write_mask(tmp_path / "x.png", m + 70000, k)


def _labels(drift, n=24):
    gen = ProceduralGenerator(ProceduralGeneratorParams(drift=drift), 64, 64)
    lab = DifferenceLabeler(DifferenceLabelerParams())
    ious = []
    for i in range(n):
        prompt = f"A blue ball in a {['forest', 'kitchen', 'harbour', 'park'][i % 4]}"
        r = PromptRecord(f"s{i}", prompt, prompt, (3,), ("blue ball",), 100 + i)
        pair = gen.render(r)
        [res] = lab.label(
            [LabelInput(r.id, pair.positive, pair.counterfactual, (3,), ("blue ball",))], 255
        )
        ious.append(class_iou(res.mask, pair.oracle_mask, [3]))
    return float(np.mean(ious))


def test_difference_labeler_agrees_with_oracle_and_degrades_with_drift():
    ious = [_labels(d) for d in (0.0, 0.5, 1.0)]
    assert ious[0] > 0.8
    assert ious[0] > ious[1] > ious[2]


def test_two_classes_assigned_by_colour_word_or_ignored():
    img = np.zeros((20, 20, 3), np.uint8)
    fg = np.zeros((20, 20), bool)
    img[2:6, 2:6] = (214, 38, 40)
    img[10:15, 10:15] = (40, 84, 222)
    fg[2:6, 2:6] = fg[10:15, 10:15] = True
    m = assign_classes(fg, img, (7, 9), ("blue kite", "red ball"), 255)
    assert (m[2:6, 2:6] == 9).all() and (m[10:15, 10:15] == 7).all() and (m[~fg] == 0).all()
    same = assign_classes(fg, img, (7, 9), ("red kite", "red ball"), 255)
    assert (same[fg] == 255).all()


def test_touching_objects_of_two_colours_are_split():
    img = np.full((20, 24, 3), 200, np.uint8)
    fg = np.zeros((20, 24), bool)
    img[4:16, 2:12] = (214, 38, 40)  # red, touching blue: one component
    img[4:16, 12:22] = (40, 84, 222)
    fg[4:16, 2:22] = True
    m = assign_classes(fg, img, (5, 6), ("red ball", "blue star"), 255)
    assert (m[4:16, 2:12] == 5).all() and (m[4:16, 12:22] == 6).all()


def test_pattern_shade_counts_for_its_class():
    # a striped teal box (teal and dark teal bands) beside a navy ball: dark teal is nearer navy
    # than teal, but it is the striped box's own pattern colour
    teal, dark, navy = BY_NAME["striped teal box"].paints + BY_NAME["navy ball"].paints
    img = np.full((20, 30, 3), 220, np.uint8)
    fg = np.zeros((20, 30), bool)
    img[4:16, 2:14] = teal
    img[4:16, 2:14:2] = dark
    img[4:16, 18:28] = navy
    fg[4:16, 2:14] = fg[4:16, 18:28] = True
    m = assign_classes(fg, img, (1, 2), ("striped teal box", "navy ball"), 255)
    assert (m[4:16, 2:14] == 1).all() and (m[4:16, 18:28] == 2).all()


def test_colours_told_apart_under_every_light():
    # every pair of catalogue colours, two objects per image, plain light, fog and night: the
    # share of object pixels given to the other class (the "confusion") stays small
    gen = ProceduralGenerator(ProceduralGeneratorParams(), 64, 64)
    lab = DifferenceLabeler(DifferenceLabelerParams())
    rng = np.random.default_rng(0)
    lights = ("", ", in soft morning fog", ", at night")
    wrong = total = 0
    for i, (a, b) in enumerate(combinations(COLOURS, 2)):
        names = (f"{a} {rng.choice(SHAPES)}", f"{b} {rng.choice(SHAPES)}")
        prompt = f"A {names[0]} on the left next to a {names[1]}, in a park{lights[i % 3]}"
        pair = gen.render(PromptRecord(f"s{i}", prompt, "", (1, 2), names, i))
        inp = LabelInput(f"s{i}", pair.positive, pair.counterfactual, (1, 2), names)
        [res] = lab.label([inp], 255)
        o = pair.oracle_mask
        wrong += int(((o == 1) & (res.mask == 2)).sum() + ((o == 2) & (res.mask == 1)).sum())
        total += int(((o > 0) & (res.mask > 0)).sum())
    assert wrong / total < 0.02


def test_mask_stats():
    m = np.zeros((10, 10), int)
    m[0:2, 0:2] = 3
    m[5:7, 5:7] = 3
    m[9, 9] = 255
    s = mask_stats(m, [3, 4], 255)
    assert s == {"areas": [0.08, 0.0], "components": [2, 0], "ignore_frac": 0.01}


def test_label_stage(tmp_path):
    make_dataset(tmp_path, requests=4, per_request=3)
    frame = read_manifest(tmp_path / "label")
    assert len(frame) == 12 and frame["mask"].notna().all()
    assert frame["oracle_iou"].mean() > 0.5
    for row in frame.itertuples():
        m = read_mask(tmp_path / "label" / row.mask)
        assert set(np.unique(m)) <= {0, 255, *row.class_ids}
        assert (tmp_path / "label" / row.image).is_file()


def test_unreadable_image_is_recorded_not_fatal(tmp_path):
    make_dataset(tmp_path, requests=2, per_request=2)
    gen = read_manifest(tmp_path / "generate")
    (tmp_path / "generate" / gen["image"][1]).write_bytes(b"\x89PNG truncated")
    from magicseg.core.config import LabelParams
    from magicseg.label import run_label

    out = run_label(tmp_path / "generate", tmp_path / "l2", LabelParams(), 48)
    assert out["mask"].isna().sum() == 1 and out["id"].tolist() == gen["id"].tolist()
    assert "cannot read image" in out["meta"][1]
