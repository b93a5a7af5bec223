"""``magicseg ablate`` end to end: check the inputs, plan, queue and run what is missing, collect
and write the results (:func:`ablate`); or re-report an existing results file
(:func:`report_only`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from magicseg.ablate.queue import (
    DVC,
    QUEUE_LOG,
    Experiment,
    Planned,
    _call,
    dirty_files,
    exp_show,
    head_commit,
    match,
    plan,
    resolve_grids,
    reusable_baselines,
    reuse_recorded,
    run_queue,
    stage_counts,
)
from magicseg.ablate.report import (
    grid_results,
    previous_steps,
    read_results,
    rereport,
    write_results,
)
from magicseg.core.errors import ConfigError


@dataclass
class Outcome:
    """What :func:`ablate` did: the plan (with states), experiments queued, failures (queued or
    run but not finished) and, with ``collect``, those left unqueued (``not_run``) and those
    still queued or running in DVC's queue (``pending``: not failures, collect again later)."""

    planned: list[Planned]
    queued: list[str]
    failed: list[Planned]
    data: dict | None = None
    ran: Counter = field(default_factory=Counter)
    cached: Counter = field(default_factory=Counter)
    not_run: list[Planned] = field(default_factory=list)
    pending: list[Planned] = field(default_factory=list)


def ablate(
    grid_names: Sequence[str],
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    dry_run: bool = False,
    out: Path = Path("metrics/ablations.json"),
    collect: bool = False,
    table: Path | None = None,
    plots: Path = Path("plots/ablations"),
    root: Path = Path("."),
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Run the grids through DVC's queue, every cell of a grid on the same seeds (``seeds``, or
    None: each grid's default), and write the results (:mod:`magicseg.ablate.report`).
    ``dry_run``: print the plan and the commands, queue nothing, write nothing. ``collect``:
    queue and run nothing, write the results of the experiments already finished (a partial
    grid: each cell with the seeds it has; the rest listed as not run)."""
    # 1. Check the inputs before any work.
    root = Path(root)
    table = table or out.with_suffix(".md")
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{root.resolve()}: no dvc.yaml (run magicseg ablate in the repository)")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise ConfigError(f"--seeds: give distinct seeds >= 0 (got {list(seeds)})")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1 (got {jobs})")
    if collect and dry_run:
        raise ConfigError("--collect: writes the finished experiments' results; --dry-run "
                          "writes nothing: give one of them")  # fmt: skip
    ours = [os.path.relpath(Path(p).resolve(), root.resolve()) for p in (out, table, plots)]
    dirty = dirty_files(root, ours)
    if dirty and not (dry_run or collect):
        raise ConfigError(
            f"workspace: uncommitted changes to {', '.join(dirty[:5])}: commit or stash them "
            "first (queued experiments would run them, finished ones did not)"
        )

    # 2. The plan: every (grid, cell, seed) composed and validated; what exists already.
    grids = resolve_grids(grid_names, root, seeds)
    for g in grids:
        for cell, why in g.refused.items():
            echo(f"ablate: {g.name}/{cell} refused ({why}); the grid runs without it")
    planned = plan(grids, root)
    head = head_commit(root)
    baselines = [head, *reusable_baselines(root, head)]
    exps = exp_show(root, baselines)
    match(planned, exps, head)
    recorded = read_results(out)
    reused = reuse_recorded(planned, recorded, root, head)
    if reused:
        echo(f"ablate: {len(reused)} experiment(s) not in DVC here but recorded in {out} on a "
             "commit with the same pipeline inputs and params: reused, not run again")  # fmt: skip
    todo = [p for p in planned if p.state == "to queue"]
    counts = Counter(p.state for p in planned)
    echo(
        f"ablate: {len(planned)} experiments ({_seeds_text(grids)}): "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    names = {p.name for p in planned}
    others = sorted(
        {e.name for e in exps if e.state in ("queued", "running") and e.name not in names}
    )
    if others:
        echo(f"warning: the DVC queue also holds {', '.join(others)}: they run too")
    if dry_run:
        if dirty:
            echo(f"warning: uncommitted changes to {', '.join(dirty[:5])}: commit them first")
        for p in planned:
            where = "" if p.found is None or p.found.baseline == head else p.found.baseline[:7]
            how = "recorded, " if p.found is not None and p.found.recorded is not None else ""
            echo(f"  {p.name:<44} {p.state}" + (f" ({how}commit {where})" if where else ""))
        for p in todo:
            echo(f"  dvc exp run --queue -n {p.name} {' '.join(p.sets())}")
        return Outcome(planned, [], [])

    # 3. Queue what is missing, run the queue (--collect: neither).
    not_run = todo if collect else []
    queued = [] if collect else todo
    if not_run:
        echo(f"ablate: --collect: {len(not_run)} experiment(s) not run; none queued")
    for p in queued:
        _call([*DVC, "exp", "run", "--queue", "-n", p.name, *p.sets()], root, f"queue {p.name}")
    waiting = [] if collect else [p for p in planned if p.state != "done"]
    ran, cached = Counter(), Counter()
    if waiting:
        log = run_queue(root, jobs, len(waiting), root / QUEUE_LOG, echo)
        ran, cached = stage_counts(log)
        exps = exp_show(root, baselines)
        match(planned, exps, head)
        reuse_recorded(planned, recorded, root, head)
        echo(
            "ablate: stages run: "
            + (", ".join(f"{s} {n}" for s, n in sorted(ran.items())) or "none")
            + "; restored from the run cache: "
            + (", ".join(f"{s} {n}" for s, n in sorted(cached.items())) or "none")
        )

    # 4. Collect and write; report what did not finish, with its log.
    previous = previous_steps(recorded)
    results = {g.name: grid_results(g, planned, previous) for g in grids}
    data = write_results(results, out, table, plots)
    echo(f"ablate: wrote {out}, {table}, {plots}/")
    for p in not_run:
        echo(f"{p.name}: not run")
    # --collect beside a queue that still runs (another ablate, or `dvc exp run --run-all`):
    # its queued and running experiments have not failed; they are collected by a later call.
    pending = [p for p in planned if collect and p.state in ("queued", "running")]
    for p in pending:
        echo(f"{p.name}: still {p.state} in DVC's queue; --collect again when it has finished")
    failed = [p for p in planned if p.state != "done" and p not in not_run and p not in pending]
    for p in failed:
        echo(_failure(p, [e for e in exps if e.name == p.name]))
    return Outcome(planned, [p.name for p in queued], failed, data, ran, cached, not_run, pending)


def _failure(p: Planned, exps: Sequence[Experiment]) -> str:
    """One experiment that did not finish, with the last lines of its log."""
    failed = sorted((e for e in exps if e.state == "failed"), key=lambda e: e.timestamp)
    if not failed:
        return f"{p.name}: not finished ({p.state})"
    log = failed[-1].read_log() or ""
    tail = [line for line in log.strip().splitlines() if line.strip()][-8:]
    body = "\n".join(f"    {line}" for line in tail)
    return f"{p.name}: failed (dvc queue logs {p.name}):\n{body}"


def _seeds_text(grids) -> str:
    """``paper, masks x seeds 0,1,2`` where the grids share their seeds, else per grid."""
    seeds = {g.seeds for g in grids}
    if len(seeds) == 1:
        return f"{', '.join(g.name for g in grids)} x seeds {','.join(map(str, grids[0].seeds))}"
    return ", ".join(f"{g.name} x seeds {','.join(map(str, g.seeds))}" for g in grids)


def report_only(
    grid_names: Sequence[str],
    out: Path = Path("metrics/ablations.json"),
    table: Path | None = None,
    plots: Path = Path("plots/ablations"),
    echo: Callable[[str], None] = print,
) -> dict:
    """Re-report the grids ``grid_names`` (``all``: every grid in the file) of an existing
    results file: cell statistics and effects recomputed from the per-seed values it holds
    (:func:`magicseg.ablate.report.rereport`), then the file, the table and the plots written.
    Nothing runs and DVC is not asked."""
    table = table or out.with_suffix(".md")
    if not out.is_file():
        raise ConfigError(f"--report-only: {out} does not exist (run the grids first)")
    data = read_results(out)
    grids = data.get("grids") or {}
    wanted = list(grids) if "all" in grid_names else list(dict.fromkeys(grid_names))
    missing = [n for n in wanted if n not in grids]
    if missing:
        raise ConfigError(
            f"--grid: {', '.join(missing)} not in {out} (it holds: {', '.join(grids) or 'none'})"
        )
    results = {n: rereport(grids[n]) for n in wanted}
    data = write_results(results, out, table, plots)
    echo(f"ablate: re-reported {', '.join(wanted)} from {out}: wrote {out}, {table}, {plots}/")
    return data
