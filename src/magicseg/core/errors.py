"""User-facing errors: each is printed as one line (no traceback) with a non-zero exit."""

from __future__ import annotations


class MagicsegError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    exit_code = 2


class ConfigError(MagicsegError):
    """A bad ``params.yaml`` key or value."""


class DataError(MagicsegError):
    """Bad or missing input data (vocabulary, manifests, images)."""


class BackendError(MagicsegError):
    """A backend cannot run here (missing weights, no network, no GPU, not built yet)."""
