"""Class vocabularies: built-in lists (LVIS v1, COCO, PASCAL VOC, PASCAL Context, the offline
procedural catalogue) or a user file, normalised and checked.

Index convention everywhere: 0 = background, class ``i`` (1-based) = ``names[i - 1]``.
"""

from __future__ import annotations

import re
import unicodedata
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

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "id": np.arange(1, len(self) + 1, dtype=np.int64),
                "name": list(self.names),
                "display": list(self.display),
                "holdout": [i in self.holdout for i in range(1, len(self) + 1)],
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
    procedural (the offline generator's catalogue)."""
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


def build_vocabulary(
    source: str,
    file: str | Path | None = None,
    holdout: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> Vocabulary:
    """Load, normalise and check a vocabulary; pick ``holdout`` held-out classes by ``seed``."""
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
    if holdout >= len(names):
        raise DataError(
            f"vocabulary.holdout: {holdout} held-out classes leave none of {len(names)} to train"
        )
    pick = rng(seed, "vocabulary.holdout")
    held = pick.choice(np.arange(1, len(names) + 1), size=holdout, replace=False) if holdout else []
    return Vocabulary(tuple(names), source, frozenset(int(i) for i in held))
