"""Helpers for the thin ``stages/*.py`` entrypoints."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from magicseg.errors import MagicsegError
from magicseg.io import read_manifest
from magicseg.vocabulary import Vocabulary

F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Print a user error as one line on stderr and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MagicsegError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_vocabulary(directory: str | Path) -> Vocabulary:
    """The vocabulary written by the ``vocabulary`` stage."""
    return Vocabulary.from_frame(read_manifest(directory))
