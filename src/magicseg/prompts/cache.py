"""An on-disk cache of LLM responses, so a re-run or a crashed stage never pays for a call twice.

One JSON file per response, named by the SHA-256 of its key parts (writer, model, request text,
seed, sampling params) and sharded by the first two hex digits:
``<cache_dir>/<writer>/ab/abcdef....json``. Every file is written atomically, so a kill leaves
either a whole entry or none. Keep the directory OUTSIDE a DVC stage's outputs (DVC deletes
those before running the stage); the default lives under the repository's git-ignored
``.cache/``. API keys are never part of a key or an entry.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from magicseg.core.io import atomic_path

DEFAULT_CACHE_DIR = Path(".cache/magicseg/prompts")


def cache_key(**parts: Any) -> str:
    """SHA-256 hex digest of the key parts (JSON with sorted keys, so order does not matter)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Get/put JSON-able responses by key; safe to share between threads of one process."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored entry, or None (missing or unreadable: a corrupt file counts as a miss)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            entry = None
        with self._lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        with atomic_path(self.path(key)) as tmp:
            tmp.write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True))

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*/*.json")) if self.directory.is_dir() else 0
