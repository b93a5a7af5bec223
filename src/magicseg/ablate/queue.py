"""The experiments of ``magicseg ablate`` and DVC's queue: every (grid, cell, seed) planned as
one DVC experiment (its params composed from ``conf/`` and validated), matched against the
experiments ``dvc exp show --json`` lists (finished ones are reused), the missing ones queued
and run by ``dvc exp run --run-all``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from magicseg.ablate.grids import GRIDS, METRICS, STEP, Grid, exp_name, grid, slug
from magicseg.core.config import parse_params
from magicseg.core.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------
# one experiment's figures
# --------------------------------------------------------------------------------------------
STEP_LINE = re.compile(r"train: [\d.]+ s \((\d+) steps at ([\d.]+) s")


def step_seconds(log: str | None) -> float | None:
    """Seconds per training step of one experiment, from the train stage's own line in the
    experiment's log (``train: 412.3 s (1000 steps at 0.3981 s, validation 9.2 s)``, printed by
    :func:`magicseg.training.loop.train`; its ``timing.json`` stays in the experiment's
    temporary copy, and wall-clock is no metric). None where no line ran a step (a train stage
    up to date in the baseline's ``dvc.lock`` or restored from the run cache, or a run rebuilt
    from its finished state)."""
    found = [(int(n), float(s)) for n, s in STEP_LINE.findall(log or "") if int(n) > 0]
    return found[-1][1] if found else None


def dotted(data: dict | None, key: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


@dataclass
class Experiment:
    """One entry of ``dvc exp show --json``."""

    name: str
    rev: str
    baseline: str
    state: str  # done | queued | running | failed
    params: dict | None = None
    metrics: dict[str, dict] = field(default_factory=dict)
    log: Path | None = None
    timestamp: str = ""
    recorded: dict[str, float] | None = None
    """Its metric values as an earlier ``metrics/ablations.json`` recorded them, where the
    experiment itself is gone (another machine's ``refs/exps``): see :func:`reuse_recorded`."""

    def read_log(self) -> str | None:
        if self.log is None or not self.log.is_file():
            return None
        return self.log.read_text(errors="replace")

    def values(self) -> dict[str, float]:
        """Every metric of :data:`METRICS` it has, and ``step_s`` where it can be found."""
        if self.recorded is not None:
            return dict(self.recorded)
        out = {}
        for name, (path, key) in METRICS.items():
            v = dotted(self.metrics.get(path), key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[name] = float(v)
        step = step_seconds(self.read_log())
        if step is not None:
            out[STEP] = step
        return out


def parse_exp_show(rows: list[dict]) -> list[Experiment]:
    """The experiments in ``dvc exp show --json`` output (baseline rows -> experiments -> revs
    -> data -> metrics -> file -> data), with their state: ``done``, ``queued``, ``running``
    or ``failed``."""
    out = []
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        for entry in row.get("experiments") or []:
            executor = entry.get("executor") or {}
            state = executor.get("state") or "success"
            log = (executor.get("local") or {}).get("log")
            for rev in entry.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("error") or state == "failed":
                    status = "failed"
                elif state in ("queued", "running"):
                    status = state
                else:
                    status = "done"
                metrics = {
                    path: m["data"]
                    for path, m in (data.get("metrics") or {}).items()
                    if isinstance(m, dict) and "data" in m
                }
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
                out.append(
                    Experiment(
                        name=rev.get("name") or entry.get("name") or rev["rev"][:7],
                        rev=rev["rev"],
                        baseline=row["rev"],
                        state=status,
                        params=params,
                        metrics=metrics,
                        log=Path(log) if log else None,
                        timestamp=data.get("timestamp") or "",
                    )
                )
    return out


# --------------------------------------------------------------------------------------------
# DVC and git
# --------------------------------------------------------------------------------------------
DVC = (sys.executable, "-m", "dvc")


def _call(args: Sequence[str], cwd: Path, what: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(
            f"{what}: `{' '.join(args[2:] if args[0] == sys.executable else args)}` "
            f"failed ({tail[0]})"
        )
    return proc.stdout


def head_commit(root: Path) -> str:
    return _call(["git", "rev-parse", "HEAD"], root, "git").strip()


def dirty_files(root: Path, ignore: Sequence[str]) -> list[str]:
    """Tracked files with uncommitted changes, except those under ``ignore``."""
    out = _call(["git", "status", "--porcelain", "--untracked-files=no"], root, "git")
    files = [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]
    return [
        f for f in files if not any(f == i or f.startswith(i.rstrip("/") + "/") for i in ignore)
    ]


def pipeline_inputs(root: Path) -> list[str]:
    """``dvc.yaml`` and every path a stage depends on (what decides an experiment's result,
    beside its params)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    deps = {"dvc.yaml"}
    for stage in (spec.get("stages") or {}).values():
        for dep in stage.get("deps") or []:
            deps.add(dep if isinstance(dep, str) else next(iter(dep)))
    return sorted(deps)


def reusable_baselines(root: Path, head: str, prefix: str = "abl-") -> list[str]:
    """Earlier commits with ablation experiments (refs ``refs/exps/..``) where no pipeline
    input (:func:`pipeline_inputs`) differs from ``head``: their experiments count as this
    commit's."""
    refs = _call(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root, "git")
    bases = set()
    for ref in refs.split():
        parts = ref.split("/")  # refs/exps/<sha[:2]>/<sha[2:]>/<name>
        if len(parts) == 5 and parts[4].startswith(prefix):
            bases.add(parts[2] + parts[3])
    bases.discard(head)
    inputs = pipeline_inputs(root)
    return [base for base in sorted(bases) if unchanged(root, base, head, inputs)]


def unchanged(root: Path, base: str, head: str, paths: Sequence[str]) -> bool:
    """Whether commit ``base`` has ``paths`` as ``head`` has them (False where ``base`` is
    unknown)."""
    if base == head:
        return True
    proc = subprocess.run(
        ["git", "diff", "--quiet", base, head, "--", *paths], cwd=root, capture_output=True
    )
    return proc.returncode == 0


def reuse_recorded(planned: Sequence[Planned], data: dict, root: Path, head: str) -> list[Planned]:
    """Mark done the planned items with no experiment here whose result ``data`` (an earlier
    ``metrics/ablations.json``) records: same grid, cell, overrides and seed, run on a baseline
    commit with the same pipeline inputs (:func:`pipeline_inputs`), ``params.yaml`` and
    ``conf/`` as ``head``: the params are not in ``data`` to compare, as :func:`match` does. DVC
    keeps experiments in the local ``refs/exps`` only, so a fresh clone or another machine
    has none; without this it would run every recorded experiment again. Returns them."""
    paths = [*pipeline_inputs(root), "params.yaml", "conf"]
    checked: dict[str, bool] = {}
    reused = []
    for p in planned:
        if p.state != "to queue":
            continue
        cell = (((data.get("grids") or {}).get(p.grid) or {}).get("cells") or {}).get(p.cell)
        if not cell or not _same(cell.get("overrides"), p.overrides):
            continue
        exp = (cell.get("experiments") or {}).get(str(p.seed)) or {}
        base = exp.get("baseline")
        if not base:
            continue
        if base not in checked:
            checked[base] = unchanged(root, base, head, paths)
        if not checked[base]:
            continue
        values = {
            metric: float(stats["values"][str(p.seed)])
            for metric, stats in (cell.get("metrics") or {}).items()
            if str(p.seed) in (stats.get("values") or {})
        }
        p.found = Experiment(exp["name"], exp.get("rev", ""), base, "done", recorded=values)
        p.state = "done"
        reused.append(p)
    return reused


def exp_show(root: Path, revs: Sequence[str]) -> list[Experiment]:
    """``dvc exp show --json`` for the baselines ``revs``, parsed (:func:`parse_exp_show`)."""
    args = [*DVC, "exp", "show", "--json", "--no-pager"]
    for rev in revs:
        args += ["--rev", rev]
    return parse_exp_show(json.loads(_call(args, root, "dvc exp show") or "[]"))


def compose(root: Path, overrides: dict[str, Any]) -> dict:
    """``params.yaml`` as ``dvc exp run -S key=value ...`` composes it from ``conf/``."""
    from dvc.utils.hydra import compose_and_dump

    conf = root / "conf"
    if not (conf / "config.yaml").is_file():
        raise ConfigError(f"{conf}/config.yaml: not found (run magicseg ablate in the repository)")
    with tempfile.TemporaryDirectory(prefix="magicseg-ablate-") as tmp:
        out = Path(tmp) / "params.yaml"
        sets = [f"{k}={hydra_value(v)}" for k, v in overrides.items()]
        try:
            compose_and_dump(out, str(conf.resolve()), None, "config", str(root.resolve()), sets)
        except Exception as err:  # noqa: BLE001 - Hydra raises many kinds for a bad override
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"ablate: cannot compose {' '.join(sets)} ({first})") from None
        return yaml.safe_load(out.read_text())


def hydra_value(value: Any) -> str:
    """A value as a Hydra override writes it (``-S key=<this>``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if re.fullmatch(r"[\w./-]+", text) else json.dumps(text)


# --------------------------------------------------------------------------------------------
# plan, run, collect
# --------------------------------------------------------------------------------------------
@dataclass
class Planned:
    """One (grid, cell, seed): its experiment name, overrides, expected params and the
    experiment that holds its result (None until there is one)."""

    grid: str
    cell: str
    seed: int
    name: str
    overrides: dict[str, Any]
    params: dict
    found: Experiment | None = None
    state: str = "to queue"  # done | queued | running | to queue

    def sets(self) -> list[str]:
        pairs = {"seed": self.seed, **self.overrides}
        return [x for k, v in pairs.items() for x in ("-S", f"{k}={hydra_value(v)}")]


def resolve_grids(
    names: Sequence[str], root: Path, seeds: Sequence[int] | None = None
) -> list[Grid]:
    """The grids asked for (``all``: every one), each on ``seeds`` (None: the grid's own
    default, :data:`magicseg.ablate.grids.DEFAULT_SEEDS`), the sampling grid's K values from
    the vocabulary of the composed params at each of its seeds."""
    from magicseg.core.vocabulary import build_vocabulary

    wanted = list(GRIDS) if "all" in names else list(dict.fromkeys(names))
    for n in wanted:
        if n not in GRIDS:
            raise ConfigError(f"--grid: unknown grid {n!r} (available: {', '.join(GRIDS)}, all)")
    out = []
    for n in wanted:
        size = trainable = 0
        if n == "sampling":
            p = parse_params(compose(root, {}), "params (composed from conf/)")
            own = tuple(seeds) if seeds is not None else grid(n, 0, 0).seeds
            vocabs = [build_vocabulary(**vocabulary_args(p, s)) for s in own]
            size, trainable = len(vocabs[0]), min(len(v.trainable) for v in vocabs)
        g = grid(n, size, trainable)
        out.append(g if seeds is None else dataclasses.replace(g, seeds=tuple(seeds)))
    return out


def vocabulary_args(p, seed: int) -> dict[str, Any]:
    """``build_vocabulary``'s keyword arguments from validated params at the global ``seed``
    (the held-out draw at ``vocabulary.holdout_seed`` where it is set)."""
    args = p.vocabulary.model_dump()
    args.pop("holdout_seed")
    return args | {"seed": p.vocabulary.holdout_seed_for(seed)}


def plan(grids: Sequence[Grid], root: Path) -> list[Planned]:
    """Every (grid, cell, seed of the grid), its params composed and validated (a bad override
    is a ConfigError before any experiment runs)."""
    out = []
    for g in grids:
        names = [slug(c) for c in g.cells]
        if len(set(names)) != len(names):
            raise ConfigError(f"grid {g.name}: two cells share an experiment name ({names})")
        for cell, overrides in g.cells.items():
            base = compose(root, overrides)
            for seed in g.seeds:
                params = {**base, "seed": seed}
                parse_params(params, f"grid {g.name}, cell {cell}")
                out.append(
                    Planned(g.name, cell, seed, exp_name(g.name, cell, seed), overrides, params)
                )
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def match(planned: Sequence[Planned], exps: Sequence[Experiment], head: str) -> None:
    """Fill each planned item's ``found`` and ``state`` from the experiments: a finished one of
    the same name and params (this commit's first), else one queued or running (here, or on an
    earlier commit of ``exps`` with the same params: a commit made beside a running queue). A
    finished one of this commit with the name but other params is an error (its name is
    taken)."""
    by_name: dict[str, list[Experiment]] = {}
    for e in exps:
        by_name.setdefault(e.name, []).append(e)
    for p in planned:
        candidates = sorted(by_name.get(p.name, []), key=lambda e: e.baseline != head)
        done = [e for e in candidates if e.state == "done"]
        good = [e for e in done if _same(e.params, p.params)]
        if good:
            p.found, p.state = good[0], "done"
            continue
        stale = [e for e in done if e.baseline == head]
        if stale:
            diff = _first_difference(stale[0].params, p.params)
            raise ConfigError(
                f"{p.name}: a finished experiment of this name ran with other params ({diff}): "
                f"remove it (dvc exp remove {p.name}) and run again"
            )
        # queued or running: here, or on an earlier commit of ``exps`` (one whose pipeline inputs
        # are this one's: committing beside a running queue) with the grid's params
        active = [
            e
            for e in candidates
            if e.state in ("queued", "running")
            and (e.baseline == head or _same(e.params, p.params))
        ]
        if active:
            p.found, p.state = active[0], active[0].state
        else:
            p.found, p.state = None, "to queue"


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if not _same(a.get(k), b.get(k)):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r}, the grid says {b!r}"


QUEUE_LOG = Path(".cache/magicseg/ablate/queue.log")
"""DVC's output while ablate runs the queue (relative to the repository)."""
STAGE_RAN = re.compile(r"Running stage '([\w-]+)'")
STAGE_CACHED = re.compile(r"Stage '([\w-]+)' is cached")


def stage_counts(log: str) -> tuple[Counter, Counter]:
    """Stages run and stages restored from the run cache in a DVC log."""
    return Counter(STAGE_RAN.findall(log)), Counter(STAGE_CACHED.findall(log))


def run_queue(root: Path, jobs: int, total: int, log_path: Path, echo: Callable) -> str:
    """``dvc exp run --run-all --jobs N``: runs the queue to the end (every queued experiment,
    ours and any other), DVC's output to ``log_path``, a progress bar over the experiments.
    With N > 1 and no ``OMP_NUM_THREADS`` set, each experiment gets the CPU's cores / N threads
    (``OMP_NUM_THREADS``, which ``train.num_threads: 0`` follows), so that N jobs do not
    oversubscribe the cores."""
    from tqdm import tqdm

    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        echo(f"ablate: {jobs} jobs at OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each")

    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [*DVC, "exp", "run", "--run-all", "--jobs", str(jobs)]
    lines = []
    with (
        log_path.open("w") as log,
        tqdm(total=total, desc="ablate", unit="exp") as bar,
        subprocess.Popen(
            args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        started = 0
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            m = re.match(r"Reproducing experiment '(.+)'", line.strip())
            if m:  # the one before has finished
                bar.update(max(0, min(started, total) - bar.n))
                started += 1
                bar.set_postfix_str(m.group(1))
        bar.update(total - bar.n)
    echo(f"ablate: DVC's output in {log_path}")
    return "".join(lines)
