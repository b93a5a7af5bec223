import hashlib
from itertools import combinations

import numpy as np
import pytest
from scipy import ndimage
from tests.helpers import make_dataset

from magicseg.core.catalogue import BY_NAME, CATALOGUE, COLOURS, SHAPES, min_colour_distance
from magicseg.core.config import ProceduralGeneratorParams
from magicseg.core.errors import DataError
from magicseg.core.io import read_image, read_manifest, read_mask
from magicseg.generate import records_from_manifest
from magicseg.generate.base import PromptRecord
from magicseg.generate.procedural import ProceduralGenerator, read_prompt, shape_mask


def rec(prompt="A red kite in a misty pine forest", names=("red kite",), ids=(1,), seed=3):
    return PromptRecord("r0-0", prompt, prompt, ids, names, seed)


def gen(drift=0.2, **kw):
    return ProceduralGenerator(ProceduralGeneratorParams(drift=drift, **kw), 64, 64)


def test_catalogue_names_unique_and_shapes_draw():
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE) == 252 < 255  # uint8 masks
    for shape in SHAPES:
        for r in (12, 6):  # default and "tiny" at 64 px
            m = shape_mask(shape, 64, 64, 32, 32, r, 0.3)
            assert 0.3 * np.pi * r**2 < m.sum() <= 1.1 * np.pi * r**2, (shape, r)
            assert ndimage.label(m)[1] == 1, (shape, r)  # one piece


def test_shapes_are_told_apart_at_64_px():
    # the best IoU of two shapes over rotations and scales: no pair closer than ball and box
    def best_iou(a, b, r):
        ma = shape_mask(a, 64, 64, 32, 32, r, 0.0)
        return max(
            (ma & mb).sum() / (ma | mb).sum()
            for th in np.linspace(-0.5, 0.5, 5)
            for sc in (0.85, 1.0, 1.15)
            for mb in [shape_mask(b, 64, 64, 32, 32, r * sc, th)]
        )

    ball_box = best_iou("ball", "box", 12)
    worst = max((best_iou(a, b, 12), a, b) for a, b in combinations(SHAPES, 2))
    assert worst[0] <= ball_box + 0.02, worst


def test_colours_are_far_apart_and_patterns_darker():
    distance, a, b = min_colour_distance()
    assert distance > 90, (a, b)
    striped = BY_NAME["striped teal box"]
    assert striped.paints == (COLOURS["teal"], tuple(round(0.45 * x) for x in COLOURS["teal"]))
    assert BY_NAME["teal box"].paints == (COLOURS["teal"],)


def test_patterns_are_drawn():
    def render(name):
        return gen(drift=0.0).render(rec(f"a photo of a {name}", (name,)))

    plain, striped, dotted = (render(n) for n in ("red box", "striped red box", "dotted red box"))
    for pair in (plain, striped, dotted):
        assert 0.02 < (pair.oracle_mask == 1).mean() < 0.5
    dark = [(p.positive[p.oracle_mask == 1].sum(-1) < 200).mean() for p in (plain, striped, dotted)]
    assert dark[0] < 0.02 and 0.3 < dark[1] < 0.7 and 0.1 < dark[2] < 0.45


def test_pair_same_seed_same_bytes_and_object_only_in_positive():
    a, b = gen().render(rec()), gen().render(rec())
    assert np.array_equal(a.positive, b.positive) and np.array_equal(
        a.counterfactual, b.counterfactual
    )
    assert a.positive.dtype == np.uint8 and a.positive.shape == (64, 64, 3)
    obj = a.oracle_mask == 1
    assert 0.02 < obj.mean() < 0.5
    # without drift the counterfactual equals the positive outside the object
    c = gen(drift=0.0).render(rec())
    assert np.array_equal(c.positive[~obj], c.counterfactual[~obj])
    assert np.abs(c.positive[obj].astype(int) - c.counterfactual[obj]).mean() > 20


def test_drift_leaves_positive_unchanged_and_grows_the_difference():
    pos = [gen(d).render(rec()) for d in (0.0, 0.5, 1.0)]
    assert all(np.array_equal(pos[0].positive, p.positive) for p in pos)
    bg = pos[0].oracle_mask == 0
    diffs = [np.abs(p.positive[bg].astype(int) - p.counterfactual[bg]).mean() for p in pos]
    assert diffs[0] == 0 < diffs[1] < diffs[2]


def test_prompt_words_drive_the_scene():
    assert read_prompt("a photo of a red kite").style is None
    spec = read_prompt("A tiny red kite on the left, in a snowy mountain trail at night")
    assert (spec.style, spec.size, spec.place) == ("snow", 0.16, (None, 0.28))
    plain = gen().render(rec("a photo of a red kite"))
    rich = gen().render(rec("A red kite in a crowded market street"))
    bgp, bgr = plain.positive[plain.oracle_mask == 0], rich.positive[rich.oracle_mask == 0]
    assert bgp.std(0).mean() < bgr.std(0).mean()  # plain background vs textured clutter


def test_class_names_do_not_set_the_scene():
    # "blue" is a lighting word of the grammar ("cool blue dusk light"), but in "blue heart"
    # it is the object's colour: the scene is read from the prompt without the class names
    blue = gen(drift=0.0).render(rec("A blue heart in a forest", ("blue heart",)))
    red = gen(drift=0.0).render(rec("A red heart in a forest", ("red heart",)))
    bg = (blue.oracle_mask == 0) & (red.oracle_mask == 0)
    assert np.array_equal(blue.positive[bg], red.positive[bg])
    dusk = gen(drift=0.0).render(
        rec("A red heart in a forest, in cool blue dusk light", ("red heart",))
    )
    assert not np.array_equal(dusk.positive[bg], red.positive[bg])


def test_unknown_class_refused_before_work():
    with pytest.raises(DataError, match="cannot draw 'owl'"):
        gen().check([rec(names=("owl",))])


def test_generate_stage_outputs(tmp_path):
    make_dataset(tmp_path, requests=4, per_request=2)
    frame = read_manifest(tmp_path / "generate")
    assert len(frame) == 8 and frame["id"].is_unique
    for row in frame.itertuples():
        pos = read_image(tmp_path / "generate" / row.image)
        mask = read_mask(tmp_path / "generate" / row.oracle_mask)
        assert pos.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, *row.class_ids}
    recs = records_from_manifest(read_manifest(tmp_path / "prompts"))
    assert [r.id for r in recs] == list(frame["id"])


def test_generate_is_deterministic(tmp_path):
    make_dataset(tmp_path / "a", requests=3)
    make_dataset(tmp_path / "b", requests=3)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted((root / "generate").rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_asks_for_nothing_reads_the_counterfactual_prompt():
    from magicseg.generate.procedural import asks_for_nothing

    assert asks_for_nothing("a photo of nothing")
    assert asks_for_nothing("A photo of a nothing and a nothing")  # the literal rewrite
    assert not asks_for_nothing("nothing in a misty pine forest")
    assert not asks_for_nothing("a photo of nothing, at night")
    assert not asks_for_nothing("")


def _outside_changed(pair, level=0.12 * 255):
    """Share of the pixels outside the objects where the counterfactual differs (max RGB)."""
    bg = pair.oracle_mask == 0
    change = np.abs(pair.positive.astype(int) - pair.counterfactual).max(-1)
    return float((change[bg] > level).mean())


def test_plain_counterfactual_is_a_void_and_rich_keeps_the_scene():
    def plain(seed, mode="void"):
        r = PromptRecord(
            "p", "a photo of a red kite", "a photo of nothing", (1,), ("red kite",), seed
        )
        return gen(plain_counterfactual=mode).render(r)

    def rich(seed):
        prompt = "A red kite in a crowded market street"
        r = PromptRecord(
            "r", prompt, "nothing in a crowded market street", (1,), ("red kite",), seed
        )
        return gen().render(r)

    voids = [plain(s) for s in range(12)]
    scenes = [plain(s, "scene") for s in range(12)]
    riches = [rich(s) for s in range(12)]
    assert all(p.meta["counterfactual"] == "void" for p in voids)
    assert all(p.meta["counterfactual"] == "scene" for p in scenes + riches)
    # the void changes only the counterfactual: the positive and mask are the scene mode's
    for v, s in zip(voids, scenes, strict=True):
        assert np.array_equal(v.positive, s.positive) and np.array_equal(
            v.oracle_mask, s.oracle_mask
        )
    # a void differs from its positive over most pixels outside the object, a kept scene over few
    assert min(_outside_changed(p) for p in voids) > 0.6
    assert max(_outside_changed(p) for p in scenes + riches) < 0.2
    # blank and noisy voids both occur, and the same seed gives the same void
    spread = [float(p.counterfactual.astype(float).std((0, 1)).mean()) for p in voids]
    assert min(spread) < 8 < max(spread)
    assert np.array_equal(plain(3).counterfactual, voids[3].counterfactual)
