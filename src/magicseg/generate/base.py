"""The pair-generator protocol and its data types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class PromptRecord:
    """One row of the prompts manifest, as a generator sees it.

    ``class_names`` are display names, aligned with ``class_ids`` (1-based vocabulary indices).
    ``seed`` determines the pair's initial noise: positive and counterfactual share it.
    """

    id: str
    prompt: str
    cf_prompt: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    seed: int


@dataclass
class Pair:
    """A generated pair: ``positive`` and ``counterfactual`` are HWC uint8 RGB arrays;
    ``oracle_mask`` (HW int, vocabulary indices, 0 = background) when the generator knows
    the exact object pixels; ``meta`` holds per-sample facts (timing, model, ...);
    ``cf_region`` (HW bool) when the counterfactual is the positive with only that region
    repainted (``counterfactual_mode: inpaint``): outside it the two images are identical."""

    positive: np.ndarray
    counterfactual: np.ndarray
    oracle_mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    cf_region: np.ndarray | None = None


class PairGenerator(Protocol):
    """Paints a positive and a counterfactual image per prompt record."""

    name: str

    def check(self, records: Sequence[PromptRecord]) -> None:
        """Raise a MagicsegError before any work if a record cannot be generated."""
        ...

    def generate(self, batch: Sequence[PromptRecord]) -> list[Pair]: ...
