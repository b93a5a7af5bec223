import pytest

from magicseg.core.errors import DataError
from magicseg.core.vocabulary import (
    Vocabulary,
    build_vocabulary,
    builtin_names,
    check_names,
    display_name,
    name_words,
)


@pytest.mark.parametrize(
    "source, n", [("lvis", 1203), ("coco", 80), ("voc", 20), ("context", 59), ("procedural", 252)]
)
def test_builtin_sizes(source, n):
    vocab = build_vocabulary(source)
    assert len(vocab) == n
    assert len(set(vocab.names)) == n


def test_lvis_keeps_disambiguation_for_eval_and_bare_name_for_prompts():
    vocab = build_vocabulary("lvis")
    i = vocab.index("yoke (animal equipment)")
    assert vocab.names[i - 1] == "yoke (animal equipment)"
    assert vocab.display[i - 1] == "yoke"
    assert vocab.names[0] == "aerosol can"  # line n = LVIS id n


def test_normalisation():
    assert check_names(["  Traffic_Light ", "Teddy   Bear"], "x") == ["traffic light", "teddy bear"]
    assert display_name("bow (weapon)") == "bow"


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "empty"),
        (["cat", "  "], "line 2: empty class name"),
        (["cat", "dog", "Cat"], "line 3: duplicate class name 'cat' (first on line 1)"),
        (["cat", "do\tg\x00"], "line 2: class name"),
        (["cat", "💥"], "line 2: class name"),
        (["cat (big"], "line 1: class name"),
        (["x" * 81], "longer than 80"),
    ],
)
def test_bad_vocabularies_name_the_line(names, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_names(names, "classes.txt")


def test_user_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("school bus\nowl\n\nred kite\n")
    vocab = build_vocabulary("file", f)
    assert vocab.names == ("school bus", "owl", "red kite")
    with pytest.raises(DataError, match="does not exist"):
        build_vocabulary("file", tmp_path / "missing.txt")


def test_holdout_is_seeded_and_round_trips():
    a = build_vocabulary("procedural", holdout_combination=8, holdout_novel_words=2, seed=0)
    b = build_vocabulary("procedural", holdout_combination=8, holdout_novel_words=2, seed=0)
    c = build_vocabulary("procedural", holdout_combination=8, holdout_novel_words=2, seed=1)
    assert a.holdout == b.holdout and a.holdout != c.holdout
    assert len(a.trainable) == len(a) - len(a.holdout)
    frame = a.to_frame()
    assert Vocabulary.from_frame(frame) == a
    assert set(frame.loc[frame["holdout"], "holdout_kind"]) == {"combination", "novel"}
    assert frame.loc[~frame["holdout"], "holdout_kind"].isna().all()
    with pytest.raises(DataError, match="holdout_novel_words"):
        build_vocabulary("voc", holdout_novel_words=20)
    with pytest.raises(DataError, match="holdout_combination"):
        build_vocabulary("voc", holdout_combination=1)


def test_holdout_kinds_follow_the_words():
    vocab = build_vocabulary("procedural", holdout_combination=16, holdout_novel_words=2, seed=0)
    combination = vocab.heldout_of_kind("combination")
    novel = vocab.heldout_of_kind("novel")
    assert len(combination) == 16 and sorted(combination + novel) == sorted(vocab.holdout)
    seen = vocab.seen_words
    # a combination's words are all seen in training, apart
    assert all(name_words(vocab.names[i - 1]) <= seen for i in combination)
    # exactly two novel words; every class that has one is held out, and only they are unseen
    assert len(vocab.novel_words) == 2 and not set(vocab.novel_words) & seen
    with_novel = [i for i, n in enumerate(vocab.names, 1) if name_words(n) & {*vocab.novel_words}]
    assert sorted(with_novel) == novel
    # the drawn words are the only unseen ones: "cyan ball" held out with cyan, ball stays seen
    assert all(name_words(vocab.names[i - 1]) - set(vocab.novel_words) <= seen for i in novel)
    assert len(vocab.trainable) == len(vocab) - 16 - len(novel) > 150


def test_holdout_works_on_any_vocabulary():
    coco = build_vocabulary("coco", holdout_combination=1, holdout_novel_words=3, seed=0)
    assert len(coco.novel_words) == 3
    # a word takes every class that contains it ("dog" would take "hot dog" too)
    for i in coco.heldout_of_kind("novel"):
        assert name_words(coco.names[i - 1]) & set(coco.novel_words)
    assert all(
        name_words(coco.names[i - 1]) <= coco.seen_words
        for i in coco.heldout_of_kind("combination")
    )
    assert build_vocabulary("lvis").holdout == frozenset()


def test_builtin_unknown():
    with pytest.raises(DataError):
        builtin_names("imagenet")
