"""Push a Hugging Face export to the hub: ``magicseg export --format hf --push-to-hub REPO``.

:func:`check_push` runs before the export does any work: offline mode, a bad repo id, no
token, a hub that does not answer (``HF_ENDPOINT`` or huggingface.co, 10 s) or refuses the
token are each one line, exit 2, and nothing is uploaded. :func:`push_export` then uploads the
card and the Parquet shards (not the Arrow copy) as one commit; remote shards the export no
longer has are deleted in that commit, so ``data/train-*`` never mixes two exports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from magicseg.core.errors import BackendError, ConfigError

DEFAULT_ENDPOINT = "https://huggingface.co"
NO_TOKEN = "--push-to-hub: no Hugging Face token (set HF_TOKEN or run huggingface-cli login)"


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def check_push(repo_id: str, endpoint: str | None = None, timeout: float = 10.0) -> str:
    """The token to push ``repo_id`` with, once the hub has answered for it; a one-line
    ConfigError or BackendError otherwise. Uploads nothing."""
    # 1. Offline mode and the repo id.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            raise BackendError(f"--push-to-hub: {var} is set (offline mode): unset it to push")
    try:
        from huggingface_hub import get_token
        from huggingface_hub.utils import build_hf_headers, get_session, validate_repo_id
    except ImportError:
        raise BackendError(
            "--push-to-hub needs huggingface_hub: pip install 'magicseg[hf]'"
        ) from None
    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise ConfigError(
            f"--push-to-hub: {repo_id!r} is not a hub repo id (like 'org/name')"
        ) from None

    # 2. A token.
    token = get_token()
    if not token:
        raise BackendError(NO_TOKEN)

    # 3. The hub answers and takes the token (whoami, with a timeout: the client has none).
    url = _endpoint(endpoint)
    try:
        r = get_session().get(
            f"{url}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=timeout
        )
    except Exception as err:  # noqa: BLE001 - connection errors come in many classes
        raise BackendError(
            f"--push-to-hub: cannot reach the Hugging Face hub at {url} (no network? "
            f"{type(err).__name__}); nothing was uploaded"
        ) from None
    if r.status_code == 401:
        raise BackendError(
            f"--push-to-hub: {url} refused the Hugging Face token (401): set a valid HF_TOKEN "
            "or run huggingface-cli login"
        )
    if r.status_code != 200:
        raise BackendError(
            f"--push-to-hub: {url} answered {r.status_code} to whoami; nothing was uploaded: "
            "try again later"
        )
    return token


def push_export(
    out: str | Path,
    repo_id: str,
    private: bool,
    token: str,
    endpoint: str | None = None,
    api: Any = None,
) -> str:
    """Create (or reuse) the dataset repo and upload ``README.md`` and ``data/*.parquet`` of
    the export in ``out`` as one commit; returns the commit URL. A ``--private`` push to an
    existing public repo is refused before any upload."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=_endpoint(endpoint), token=token)
    out = Path(out)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if private and not getattr(api.repo_info(repo_id, repo_type="dataset"), "private", True):
            raise BackendError(
                f"--private: {repo_id} already exists and is public: make it private on the hub "
                "first (nothing was uploaded)"
            )
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(out),
            allow_patterns=["README.md", "data/*.parquet"],
            delete_patterns=["data/*.parquet"],
            commit_message=f"magicseg export ({out.name})",
        )
    except BackendError:
        raise
    except Exception as err:  # noqa: BLE001 - hub and network errors come in many classes
        first = str(err).splitlines()[0] if str(err) else ""
        raise BackendError(
            f"--push-to-hub: pushing to {repo_id} failed ({type(err).__name__}: {first}); the "
            f"export is kept in {out}: re-run the command to retry"
        ) from None
    return str(getattr(commit, "commit_url", commit))
