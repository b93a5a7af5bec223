"""Class vocabularies: built-in lists (LVIS v1, COCO, PASCAL VOC, PASCAL Context, the offline
procedural catalogue) or a user file, normalised and checked.

Index convention everywhere: 0 = background, class ``i`` (1-based) = ``names[i - 1]``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from magicseg.core.errors import DataError
from magicseg.core.seeding import rng

VOC = (
    "aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dining table, dog, horse, "
    "motorbike, person, potted plant, sheep, sofa, train, tv monitor"
)
CONTEXT59 = (
    "aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, "
    "cabinet, car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, "
    "floor, flower, food, grass, ground, horse, keyboard, light, motorbike, mountain, mouse, "
    "person, plate, platform, potted plant, road, rock, sheep, shelves, sidewalk, sign, sky, "
    "snow, sofa, table, track, train, tree, truck, tv monitor, wall, water, window, wood"
)
COCO = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire "
    "hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, "
    "zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports "
    "ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, wine "
    "glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, hot "
    "dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop, "
    "mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, "
    "clock, vase, scissors, teddy bear, hair drier, toothbrush"
)


def _split_builtin(spec: str) -> list[str]:
    """'a, multi word, c' -> ['a', 'multi word', 'c']."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def normalize_name(name: str) -> str:
    """NFKC, lower case, underscores to spaces, single spaces, stripped."""
    name = unicodedata.normalize("NFKC", name).replace("_", " ").lower()
    return re.sub(r"\s+", " ", name).strip()


def display_name(name: str) -> str:
    """The bare name used in prompts: LVIS disambiguations dropped.

    >>> display_name("yoke (animal equipment)")
    'yoke'
    """
    return name.split("(", 1)[0].strip() or name


_VALID = re.compile(r"^[a-z0-9][a-z0-9 '&.,/+()-]*$")


def check_names(names: list[str], source: str) -> list[str]:
    """Normalise and validate; raise DataError naming the first bad entry."""
    if not names:
        raise DataError(f"{source}: the vocabulary is empty")
    out: list[str] = []
    seen: dict[str, int] = {}
    for line, raw in enumerate(names, start=1):
        name = normalize_name(raw)
        if not name:
            raise DataError(f"{source}: line {line}: empty class name")
        if len(name) > 80:
            raise DataError(f"{source}: line {line}: class name longer than 80 characters")
        if not _VALID.match(name) or name.count("(") != name.count(")"):
            raise DataError(
                f"{source}: line {line}: class name {raw!r} has characters other than letters, "
                "digits, spaces, parentheses and ' & . , / + -"
            )
        if name in seen:
            raise DataError(
                f"{source}: line {line}: duplicate class name {name!r} (first on line {seen[name]})"
            )
        seen[name] = line
        out.append(name)
    return out


_WORD = re.compile(r"[a-z0-9'-]+")


def name_words(name: str) -> frozenset[str]:
    """The words of a class name's display form: "striped red ball" -> {striped, red, ball}."""
    return frozenset(_WORD.findall(display_name(normalize_name(name))))


HOLDOUT_KINDS = ("combination", "novel")
"""Kinds of held-out classes: ``combination``, every word of the name is in some training
class ("teal heart" with teal and heart seen apart); ``novel``, a word is in none."""


@dataclass(frozen=True)
class Vocabulary:
    """Class names; index ``i`` (1-based) is ``names[i - 1]``, 0 is background."""

    names: tuple[str, ...]
    source: str = "custom"
    holdout: frozenset[int] = field(default_factory=frozenset)
    """1-based indices of classes kept out of training (open-vocabulary evaluation)."""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def display(self) -> tuple[str, ...]:
        return tuple(display_name(n) for n in self.names)

    def index(self, name: str) -> int:
        """1-based index of a (normalised) name."""
        try:
            return self.names.index(normalize_name(name)) + 1
        except ValueError:
            raise DataError(f"class {name!r} is not in the vocabulary") from None

    @property
    def trainable(self) -> list[int]:
        """1-based indices of the classes that training data may contain."""
        return [i for i in range(1, len(self) + 1) if i not in self.holdout]

    @property
    def seen_words(self) -> frozenset[str]:
        """Every word of a trainable class's name."""
        return frozenset().union(*(name_words(self.names[i - 1]) for i in self.trainable))

    def holdout_kind(self, i: int) -> str | None:
        """``combination`` or ``novel`` for a held-out class (see :data:`HOLDOUT_KINDS`), None
        for a trainable one. Derived from the names, so it cannot disagree with them."""
        if i not in self.holdout:
            return None
        return "combination" if name_words(self.names[i - 1]) <= self.seen_words else "novel"

    def heldout_of_kind(self, kind: str) -> list[int]:
        """Sorted 1-based indices of the held-out classes of one kind."""
        return [i for i in sorted(self.holdout) if self.holdout_kind(i) == kind]

    @property
    def novel_words(self) -> list[str]:
        """Words of held-out names that no trainable name contains, sorted."""
        seen = self.seen_words
        return sorted({w for i in self.holdout for w in name_words(self.names[i - 1]) - seen})

    def to_frame(self) -> pd.DataFrame:
        """Columns id, name, display, holdout (bool), holdout_kind (``combination``,
        ``novel`` or None), source."""
        ids = range(1, len(self) + 1)
        return pd.DataFrame(
            {
                "id": np.arange(1, len(self) + 1, dtype=np.int64),
                "name": list(self.names),
                "display": list(self.display),
                "holdout": [i in self.holdout for i in ids],
                "holdout_kind": pd.Series([self.holdout_kind(i) for i in ids], dtype=object),
                "source": self.source,
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Vocabulary:
        frame = frame.sort_values("id")
        if list(frame["id"]) != list(range(1, len(frame) + 1)):
            raise DataError("vocabulary manifest: ids must be 1..K in order")
        source = str(frame["source"].iloc[0]) if len(frame) else "custom"
        holdout = frozenset(int(i) for i in frame.loc[frame["holdout"], "id"])
        return cls(tuple(frame["name"]), source, holdout)


def builtin_names(source: str) -> list[str]:
    """Names of a built-in vocabulary: lvis (1203), coco (80), voc (20), context (59),
    procedural (the offline generator's catalogue, 252)."""
    if source == "lvis":
        text = resources.files("magicseg.core").joinpath("resources/lvis_v1.txt").read_text()
        return [line for line in text.splitlines() if line.strip()]
    if source == "coco":
        return _split_builtin(COCO)
    if source == "voc":
        return _split_builtin(VOC)
    if source == "context":
        return _split_builtin(CONTEXT59)
    if source == "procedural":
        from magicseg.core.catalogue import CATALOGUE

        return [c.name for c in CATALOGUE]
    raise DataError(f"unknown built-in vocabulary {source!r}")


def draw_holdout(
    names: Sequence[str], combination: int, novel_words: int, seed: int, source: str = "vocabulary"
) -> frozenset[int]:
    """1-based indices of the held-out classes, drawn by ``seed``.

    1. ``novel_words`` words, in a seeded order over every word of the names; a word is taken
       when holding out every class that contains it leaves each other word of those classes
       in some training class (so the taken words are exactly the unseen ones).
    2. ``combination`` classes, in a seeded order over the remaining ones; a class is taken
       when each of its words is still in another training class.

    Raises :class:`DataError` naming the key when the vocabulary has too few candidates, or
    when nothing would be left to train.
    """
    words = [name_words(n) for n in names]
    train = set(range(1, len(names) + 1))
    count: Counter[str] = Counter(w for ws in words for w in ws)
    pick = rng(seed, "vocabulary.holdout")

    # 1. Novel words.
    vocab_words = sorted(count)
    taken = 0
    for w in (vocab_words[j] for j in pick.permutation(len(vocab_words))):
        if taken == novel_words:
            break
        gone = [i for i in sorted(train) if w in words[i - 1]]
        loss = Counter(x for i in gone for x in words[i - 1] if x != w)
        if 0 < len(gone) < len(train) and all(count[x] > n for x, n in loss.items()):
            train -= set(gone)
            count.subtract(x for i in gone for x in words[i - 1])
            taken += 1
    if taken < novel_words:
        raise DataError(
            f"vocabulary.holdout_novel_words: {source} has only {taken} words that can be held "
            f"out with every class containing them (asked for {novel_words}); lower it"
        )

    # 2. Combinations of seen words.
    held, order = 0, sorted(train)
    for i in [order[j] for j in pick.permutation(len(order))]:
        if held == combination:
            break
        if len(train) > 1 and all(count[x] > 1 for x in words[i - 1]):
            train.discard(i)
            count.subtract(words[i - 1])
            held += 1
    if held < combination:
        raise DataError(
            f"vocabulary.holdout_combination: {source} has only {held} classes whose words all "
            f"stay in other training classes (asked for {combination}); lower it"
        )
    return frozenset(set(range(1, len(names) + 1)) - train)


def build_vocabulary(
    source: str,
    file: str | Path | None = None,
    *,
    holdout_combination: int = 0,
    holdout_novel_words: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> Vocabulary:
    """Load, normalise and check a vocabulary; hold classes out of training by ``seed``
    (:func:`draw_holdout`): ``holdout_novel_words`` words with every class containing them,
    and ``holdout_combination`` classes made of words seen in training."""
    if source == "file":
        path = Path(file or "")
        if not path.is_file():
            raise DataError(f"vocabulary.file: {path} does not exist")
        raw = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        names = check_names(raw, str(path))
    else:
        names = check_names(builtin_names(source), source)
    if limit is not None:
        names = names[:limit]
    held = draw_holdout(names, holdout_combination, holdout_novel_words, seed, source)
    return Vocabulary(tuple(names), source, held)
