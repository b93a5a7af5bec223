"""The prompt-writer protocol and its data types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PromptRequest:
    """Ask for ``n`` scene descriptions that each contain every class in ``classes``.

    ``classes`` are display names (no LVIS disambiguation). ``seed`` makes sampling writers
    reproducible.
    """

    classes: tuple[str, ...]
    n: int
    seed: int


class PromptWriter(Protocol):
    """Writes scene descriptions; ``write`` returns one list of strings per request."""

    name: str

    def write(self, requests: Sequence[PromptRequest]) -> list[list[str]]: ...
