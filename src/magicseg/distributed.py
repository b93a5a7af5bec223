"""Scale-out of the data stages over processes and machines (``torchrun`` / ``accelerate launch``).

One rank per GPU. Every rank runs the same stage command; the launcher sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: one process, rank 0 of 1). Samples are assigned by a
stable hash of their id (:func:`owner`), so each sample has exactly one owner whatever the order
of the input, and a rank's share does not depend on the batch size. Every rank writes its files
and a shard manifest ``<out>/.shards/<run>/rank-RRRRR-of-WWWWW.parquet``; rank 0 waits for all
shards (a gloo barrier when the launcher gave a rendezvous, ``MASTER_ADDR``, else by polling the
shared filesystem), merges them into the one manifest in input order and removes ``.shards``.

All ranks must see the same ``out`` directory (a shared filesystem across nodes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd

from magicseg.core.errors import DataError
from magicseg.core.io import atomic_path

SHARDS = ".shards"
WAIT_ENV = "MAGICSEG_SHARD_WAIT_S"
"""Seconds rank 0 waits for the other ranks' shards (default one week)."""


@dataclass(frozen=True)
class Rank:
    """This process's place in the launch: ``rank`` of ``world_size`` (``local_rank`` picks the
    GPU on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current(rank: int | None = None, world_size: int | None = None) -> Rank:
    """The rank from arguments, else from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun and
    accelerate set them; SLURM's ``SLURM_PROCID``/``SLURM_NTASKS`` are used when those are
    absent), else rank 0 of 1."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad launch: RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    return Rank(rank, world_size, local)


def owner(sample_id: str, world_size: int) -> int:
    """The rank that makes ``sample_id``: a stable hash of the id mod ``world_size``."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") % world_size


def shard(ids: list[str], me: Rank) -> list[int]:
    """Positions in ``ids`` that rank ``me`` owns (every position has exactly one owner)."""
    if me.world_size == 1:
        return list(range(len(ids)))
    return [i for i, sid in enumerate(ids) if owner(sid, me.world_size) == me.rank]


def run_token(*parts: object) -> str:
    """A short digest of what determines a run's shards (the samples' cache keys): shards of an
    earlier, different run are never merged."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode() + b"\x1f")
    return h.hexdigest()[:16]


def _process_group(me: Rank, token: str):
    """A gloo group for barriers when the launcher gave a rendezvous (torchrun, accelerate),
    else None (rank 0 then polls the filesystem).

    Its store keys live under a prefix unique to this run, so several stages run one after the
    other under one torchrun (``torchrun ... bash -c "generate && label"``, or an elastic
    restart) never read each other's stale keys."""
    if me.world_size == 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        wait = timedelta(days=7)  # ranks may finish their shards hours apart
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ.get("MASTER_PORT", 29500)),
            me.world_size,
            is_master=me.is_main and not agent_store,
            timeout=wait,
        )
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefixed = dist.PrefixStore(f"magicseg/{token}/{restart}/", store)
        # gloo: a CPU barrier that works beside any GPU backend
        dist.init_process_group(
            "gloo", store=prefixed, rank=me.rank, world_size=me.world_size, timeout=wait
        )
    return dist


def gather_shards(
    out_dir: Path, token: str, frame: pd.DataFrame, me: Rank, order: list[str]
) -> pd.DataFrame | None:
    """Write this rank's shard; on rank 0 wait for all and return the merged frame, rows in
    ``order`` (ids); other ranks return None. Checks: no duplicate ids, no gaps."""
    # One path for any world size (one process too), so the manifest's bytes never depend on it.
    # 1. This rank's shard, written atomically (its presence means "done").
    directory = out_dir / SHARDS / token
    path = directory / f"rank-{me.rank:05d}-of-{me.world_size:05d}.parquet"
    with atomic_path(path) as tmp:
        frame.reset_index(drop=True).to_parquet(tmp, index=False)
    dist = _process_group(me, token)
    if dist is not None:
        dist.barrier()
    if not me.is_main:
        if dist is not None:
            dist.barrier()  # wait for rank 0's merge, so every rank exits with the manifest there
        return None

    # 2. Rank 0: every shard, then one frame in input order.
    paths = [
        directory / f"rank-{r:05d}-of-{me.world_size:05d}.parquet" for r in range(me.world_size)
    ]
    _wait_for(paths, polling=dist is None)
    parts = [pd.read_parquet(p) for p in paths]
    merged = pd.concat([p for p in parts if len(p)], ignore_index=True) if parts else frame
    ids = merged["id"].tolist() if len(merged) else []
    if len(ids) != len(set(ids)):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise DataError(f"shards under {directory}: sample {dup!r} made by two ranks")
    missing = set(order) - set(ids)
    if missing or len(ids) != len(order):
        raise DataError(
            f"shards under {directory}: {len(missing)} samples missing (e.g. "
            f"{sorted(missing)[:1]}); re-run the stage: finished samples come from the cache"
        )
    # the caller writes the manifest, then calls finish(), which releases the other ranks
    return merged.set_index("id").loc[order].reset_index()


def finish(out_dir: Path, me: Rank) -> None:
    """Rank 0, after writing the manifest: remove shards and release the other ranks."""
    if me.is_main:
        shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
    if me.world_size > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if dist.is_initialized():
            if me.is_main:
                dist.barrier()
            dist.destroy_process_group()


def bind_device(me: Rank) -> None:
    """Make ``cuda`` mean this rank's GPU (``cuda:LOCAL_RANK``), so backends that move models to
    "cuda" use one GPU per rank. No-op without torch or CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(me.local_rank % torch.cuda.device_count())


def _wait_for(paths: list[Path], polling: bool) -> None:
    if not polling:
        for p in paths:
            if not p.is_file():
                raise DataError(
                    f"{p}: shard not found after every rank finished; do all nodes share the "
                    "stage's output directory (a shared filesystem)?"
                )
        return
    limit = float(os.environ.get(WAIT_ENV, 7 * 24 * 3600))
    start, told = time.monotonic(), False
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        if time.monotonic() - start > limit:
            raise DataError(
                f"{missing[0]}: rank shard still missing after {limit:.0f} s ({WAIT_ENV}); "
                "did a rank crash? re-run it: finished samples come from the cache"
            )
        if not told:
            print(f"rank 0: waiting for {len(missing)} other rank(s) to finish", file=sys.stderr)
            told = True
        time.sleep(0.2)
