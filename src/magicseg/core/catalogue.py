"""The offline procedural catalogue: drawable categories with real names.

Each category is [pattern] colour shape: 12 colours x 17 shapes, plus striped and dotted balls
and boxes of every colour, 252 categories in all (fewer than 255, so masks stay uint8). Every
word is plain English that a sentence encoder embeds meaningfully ("teal heart", "dotted
magenta box"). The catalogue is the ``procedural`` vocabulary;
:func:`magicseg.core.vocabulary.build_vocabulary` holds classes out of training by word:
*combinations* (every word of the name seen in other training classes) and *novel words*
(every class containing the word).

The colours are saturated and far apart in RGB (the closest pairs, red-orange and yellow-lime,
are 92 apart: :func:`min_colour_distance`) and unlike the renderer's backgrounds (no white,
grey, black or brown), so the model-free difference labeler can tell two objects of a sample
apart by colour. Stripes and dots are a dark shade of the object's colour, so a patterned
object reads as one object on any background.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 40),
    "orange": (246, 122, 20),
    "yellow": (240, 214, 40),
    "lime": (150, 232, 40),
    "green": (30, 150, 50),
    "teal": (0, 130, 140),
    "cyan": (60, 210, 236),
    "blue": (40, 84, 222),
    "navy": (24, 30, 120),
    "purple": (120, 44, 176),
    "magenta": (236, 30, 176),
    "pink": (250, 150, 196),
}
SHAPES = (
    "ball",
    "box",
    "kite",
    "star",
    "ring",
    "tent",
    "heart",
    "arrow",
    "crescent",
    "cross",
    "frame",
    "bowtie",
    "drop",
    "cloud",
    "shield",
    "bone",
    "dome",
)
PATTERNS = ("striped", "dotted")
PATTERNED_SHAPES = ("ball", "box")
PATTERN_SHADE = 0.45
"""Stripes and dots are the colour times this (dark enough to read on light backgrounds)."""


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The dark shade of a colour that patterns are drawn with."""
    return tuple(int(round(PATTERN_SHADE * x)) for x in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class Category:
    """A drawable category. ``name`` is its vocabulary name: "[pattern] colour shape"."""

    colour: str
    shape: str
    texture: str = "plain"

    @property
    def name(self) -> str:
        prefix = "" if self.texture == "plain" else f"{self.texture} "
        return f"{prefix}{self.colour} {self.shape}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def pattern_rgb(self) -> tuple[int, int, int]:
        """Colour of the stripes or dots: a dark shade of the colour."""
        return shade(self.rgb)

    @property
    def paints(self) -> tuple[tuple[int, int, int], ...]:
        """Every colour the renderer paints the category with (before shading and noise)."""
        return (self.rgb,) if self.texture == "plain" else (self.rgb, self.pattern_rgb)


CATALOGUE: tuple[Category, ...] = tuple(
    [Category(c, s) for s in SHAPES for c in COLOURS]
    + [Category(c, s, p) for p in PATTERNS for s in PATTERNED_SHAPES for c in COLOURS]
)
BY_NAME: dict[str, Category] = {c.name: c for c in CATALOGUE}


def colour_of(name: str) -> tuple[int, int, int] | None:
    """Reference RGB of the first colour word in a class name, if any."""
    for word in name.lower().replace("-", " ").split():
        if word in COLOURS:
            return COLOURS[word]
    return None


def paints_of(name: str) -> tuple[tuple[int, int, int], ...] | None:
    """The colours a class is painted with: a catalogue category's (its colour, and the pattern
    shade for striped and dotted ones), else the first colour word's; None without one."""
    cat = BY_NAME.get(name.lower())
    if cat is not None:
        return cat.paints
    rgb = colour_of(name)
    return None if rgb is None else (rgb,)


def min_colour_distance() -> tuple[float, str, str]:
    """(Euclidean RGB distance, colour, colour) of the closest pair of catalogue colours."""
    return min(
        (float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b]))), a, b)
        for a, b in combinations(COLOURS, 2)
    )
