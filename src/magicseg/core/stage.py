"""Helpers for the thin ``stages/*.py`` entrypoints."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from magicseg.core.errors import MagicsegError
from magicseg.core.io import read_manifest
from magicseg.core.vocabulary import Vocabulary

F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Print a user error as one line on stderr and exit 2, without a traceback. A full disk
    (``ENOSPC``/``EDQUOT``) anywhere is a user error too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MagicsegError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" while writing {err.filename}" if err.filename else ""
            print(f"error: disk full{where}: free space and re-run", file=sys.stderr)
            raise SystemExit(MagicsegError.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_vocabulary(directory: str | Path) -> Vocabulary:
    """The vocabulary written by the ``vocabulary`` stage."""
    return Vocabulary.from_frame(read_manifest(directory))


def rank_suffix() -> str:
    """ " (rank r of n)" under a multi-process launch, else ""."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return f" (rank {os.environ.get('RANK', 0)} of {world})" if world > 1 else ""
