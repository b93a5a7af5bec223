"""Check a model reference (a local directory or a Hugging Face hub id) before loading it.

Backends call :func:`check_model_source` first, so a typo in a path or a hub id that cannot be
fetched fails in one line naming the params key, before any expensive work:

    generate.diffusers.checkpoint: ./models/sd15 does not exist (a local model directory or a hub id
    like 'org/name')
"""

from __future__ import annotations

import os
from pathlib import Path

from magicseg.core.errors import BackendError


def looks_like_path(ref: str) -> bool:
    """A local path rather than a hub id ('name' or 'org/name')."""
    return (
        ref.startswith(("/", ".", "~"))
        or ref.count("/") > 1
        or "\\" in ref
        or Path(ref).expanduser().exists()
    )


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (in the environment, or as huggingface_hub read it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - comes with transformers and diffusers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def check_model_source(
    ref: str, key: str, offline: bool | None = None, endpoint: str | None = None
) -> str:
    """Return ``"local"`` or ``"cached"`` or ``"hub"`` for a loadable ``ref``; else raise a
    one-line BackendError naming ``key``.

    A path must exist. A hub id must be in the local Hugging Face cache, or (when not
    ``offline``, default from ``HF_HUB_OFFLINE``) the hub must answer for it.
    """
    # 1. Local directories and files.
    if looks_like_path(ref):
        if not Path(ref).expanduser().exists():
            raise BackendError(
                f"{key}: {ref} does not exist (a local model directory or a hub id like 'org/name')"
            )
        return "local"

    # 2. Hub ids: the local cache first.
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ref, local_files_only=True)
        return "cached"
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    offline = hub_offline() if offline is None else offline
    if offline:
        raise BackendError(
            f"{key}: {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it first (huggingface-cli download {ref}) or give a local directory"
        )

    # 3. Ask the hub (short timeout): no network and unknown ids are both one-line errors.
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi(endpoint=endpoint).model_info(ref, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise BackendError(
            f"{key}: {ref!r} not found or not accessible on the Hugging Face hub "
            f"({type(err).__name__})"
        ) from None
    except Exception as err:  # noqa: BLE001 - connection errors come in many classes
        raise BackendError(
            f"{key}: cannot reach the Hugging Face hub for {ref!r} (no network? "
            f"{type(err).__name__}); download it where there is network, or give a local "
            "directory"
        ) from None
    return "hub"
