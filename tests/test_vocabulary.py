import pytest

from magicseg.core.errors import DataError
from magicseg.core.vocabulary import (
    Vocabulary,
    build_vocabulary,
    builtin_names,
    check_names,
    display_name,
)


@pytest.mark.parametrize(
    "source, n", [("lvis", 1203), ("coco", 80), ("voc", 20), ("context", 59), ("procedural", 48)]
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
    a = build_vocabulary("procedural", holdout=8, seed=0)
    b = build_vocabulary("procedural", holdout=8, seed=0)
    c = build_vocabulary("procedural", holdout=8, seed=1)
    assert a.holdout == b.holdout and a.holdout != c.holdout
    assert len(a.holdout) == 8 and len(a.trainable) == 40
    assert Vocabulary.from_frame(a.to_frame()) == a
    with pytest.raises(DataError, match="holdout"):
        build_vocabulary("voc", holdout=20)


def test_builtin_unknown():
    with pytest.raises(DataError):
        builtin_names("imagenet")
