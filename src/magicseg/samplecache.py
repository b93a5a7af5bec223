"""A per-sample cache: a killed stage resumes, a grown dataset makes only its new samples.

An entry is a directory ``<cache>/<key[:2]>/<key>/`` holding the sample's files and
``entry.json``; ``key`` is the SHA-256 of everything that determines the sample (backend, its
params, model, prompt, seed, input bytes, the code of the stage's library package). An entry is
built in a temporary directory and renamed into place, so it is whole or absent, never half
written. Stages then materialise their DVC outputs from the cache (hard links when possible,
else copies), so outputs are byte-identical with or without a warm cache.

Keep the cache OUTSIDE the stage's DVC outputs (DVC deletes those before running a stage):
``dvc.yaml`` passes ``--cache .cache/magicseg/<stage>`` (git-ignored).
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from magicseg.core.errors import DataError
from magicseg.core.io import atomic_path

ENTRY = "entry.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def sample_key(**parts: Any) -> str:
    """SHA-256 hex digest of JSON-able key parts (sorted keys: the order does not matter)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def code_fingerprint(*paths: str | Path) -> str:
    """Digest of the ``.py`` files under ``paths`` (files or package directories): a code
    change gives new keys, as it re-runs the stage in DVC."""
    h = hashlib.sha256()
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    for f in sorted(set(files)):
        h.update(f.name.encode() + b"\x1f" + f.read_bytes())
    return h.hexdigest()[:16]


def source_files(*objects: object) -> list[Path]:
    """The source files defining ``objects`` (classes, functions); those without one (built in
    or typed at a prompt) are skipped."""
    out = []
    for obj in objects:
        try:
            out.append(Path(inspect.getfile(obj)))  # type: ignore[arg-type]
        except (TypeError, OSError):
            continue
    return [p for p in out if p.is_file()]


def disk_full(err: OSError, where: str | Path, kept: str) -> DataError:
    """The one-line error for a full disk (``ENOSPC``/``EDQUOT``)."""
    return DataError(
        f"disk full while writing {where} ({os.strerror(err.errno or errno.ENOSPC)}): free "
        f"space and re-run; {kept}"
    )


class SampleCache:
    """Get and put per-sample entries (files + a JSON record) by key; safe across processes."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.puts = 0

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def has(self, key: str) -> bool:
        """Whether a whole entry exists (one stat, no read)."""
        return (self.path(key) / ENTRY).is_file()

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry's record (``files`` maps names to absolute paths), or None when absent."""
        d = self.path(key)
        try:
            record = json.loads((d / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        record["files"] = {name: str(d / name) for name in record.get("files", [])}
        self.hits += 1
        return record

    def put(
        self, key: str, writers: dict[str, Callable[[Path], None]], record: dict[str, Any]
    ) -> dict[str, Any]:
        """Build an entry: ``writers[name](path)`` writes each file; then ``record`` (JSON-able)
        is saved, and the directory renamed into place. Returns what :meth:`get` would.
        A full disk raises a one-line DataError; earlier entries are kept."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", suffix=".tmp", dir=final.parent))
        try:
            for name, write in writers.items():
                write(tmp / name)
            (tmp / ENTRY).write_text(
                json.dumps({**record, "files": sorted(writers)}, sort_keys=True)
            )
            try:
                os.rename(tmp, final)
            except OSError as err:  # another process made it first: theirs is equal
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in DISK_FULL:
                raise disk_full(
                    err, final, f"the {self.puts} samples made before are kept in {self.directory}"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.puts += 1
        return self.get(key)  # type: ignore[return-value]


def materialise(src: str | Path, dst: str | Path) -> None:
    """Put the cached file ``src`` at ``dst``: a hard link when the filesystem allows, else a
    copy; atomic (temp + rename), and a no-op when ``dst`` already is that file."""
    src, dst = Path(src), Path(dst)
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno in DISK_FULL:
                raise
            shutil.copyfile(src, tmp)


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temp files that a killed run left (``.<name>.*.tmp`` from atomic writes) under
    ``directory``. Call only when no process writes there. Returns how many."""
    n = 0
    for p in Path(directory).rglob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def iter_keys(cache: SampleCache) -> Iterable[str]:
    """Keys of the whole entries in the cache (for tests and tools)."""
    for entry in cache.directory.glob("*/*/" + ENTRY):
        yield entry.parent.name
