"""What every real-dataset reader yields and knows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from magicseg.core.errors import DataError


@dataclass
class Sample:
    """``image``: HWC uint8 RGB; ``label``: HW int64 (0 = background, ``k`` = ``names[k - 1]``,
    the dataset's ``ignore`` value for unlabelled pixels)."""

    id: str
    image: np.ndarray
    label: np.ndarray


class RealDataset(Protocol):
    """A real dataset's split: ``names`` (K class names, 1-based in labels), ``ignore``,
    ``variants`` (metrics key -> whether background is scored), ``len()`` and iteration."""

    name: str
    names: list[str]
    ignore: int
    variants: dict[str, bool]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sample]: ...


def require(root: Path, parts: list[str], key: str, layout: str) -> None:
    """DataError naming ``key`` and the expected ``layout`` unless every ``root/part`` exists."""
    missing = [p for p in parts if not (root / p).exists()]
    if missing:
        raise DataError(
            f"evaluate.{key}.root: {root} does not hold {missing[0]} (expected layout: {layout})"
        )
