"""The offline procedural catalogue: drawable categories with real names.

Each category is colour x shape x texture ("red kite", "striped blue ball"). The catalogue is the
``procedural`` vocabulary; held-out combinations (colour x shape pairs never prompted in
training) make the open-vocabulary test.
"""

from __future__ import annotations

from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 40),
    "green": (38, 160, 56),
    "blue": (40, 84, 222),
    "yellow": (236, 206, 36),
    "purple": (132, 52, 186),
    "orange": (246, 136, 26),
}
SHAPES = ("ball", "box", "kite", "star", "ring", "tent")
STRIPED_SHAPES = ("ball", "box")


@dataclass(frozen=True)
class Category:
    """A drawable category. ``name`` is its vocabulary name."""

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


CATALOGUE: tuple[Category, ...] = tuple(
    [Category(c, s) for s in SHAPES for c in COLOURS]
    + [Category(c, s, "striped") for s in STRIPED_SHAPES for c in COLOURS]
)
BY_NAME: dict[str, Category] = {c.name: c for c in CATALOGUE}


def colour_of(name: str) -> tuple[int, int, int] | None:
    """Reference RGB of the first colour word in a class name, if any."""
    for word in name.lower().replace("-", " ").split():
        if word in COLOURS:
            return COLOURS[word]
    return None
