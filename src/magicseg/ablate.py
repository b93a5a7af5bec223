"""``magicseg ablate``: named grids of DVC experiments over several global seeds, one table.

A grid is a set of named cells, each a few params overrides (:data:`GRIDS`, plus the sampling
grid built from the vocabulary by :func:`grid`). Every (cell, seed) is one DVC experiment,
``dvc exp run --queue -n abl-<grid>-<cell>-s<seed> -S seed=<seed> -S key=value ...``, run by
DVC's queue in a temporary copy of the repository (the workspace is never touched). Experiments
that share their data stages (same seed, same data params) share them through DVC's run cache.

A re-run finds the finished experiments by name in ``dvc exp show --json`` (the current commit's,
and those of earlier commits where no file a stage depends on has changed since) and queues only
the rest. Then it collects every experiment's metrics and writes:

- ``metrics/ablations.json``: per grid, per cell, the overrides, the experiments, and per metric
  ``n``, ``mean``, ``std`` (sample, ddof 1) and the per-seed ``values``; per grid the named
  effects (linear combinations of cell means: a difference, or the difference of two differences
  for an interaction) with ``diff``, its standard error ``se`` = sqrt(sum c^2 s^2 / n) and
  ``exceeds_noise`` = |diff| > 2 se;
- ``metrics/ablations.md``: the same as Markdown tables (mean ± std; effects ± SE, in bold where
  they exceed twice their SE);
- ``plots/ablations/<grid>.csv``: cell, metric, mean, lo, hi, n (bars with error bars: the
  ``plots/ablations`` plot of ``dvc.yaml``, template ``.dvc/plots/bars_error.json``).
"""

from __future__ import annotations

import csv
import io
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

from magicseg.core.config import parse_params
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import atomic_path

# --------------------------------------------------------------------------------------------
# the grids
# --------------------------------------------------------------------------------------------
CF_ON_WEIGHT = 0.5
"""``train.cf_weight`` of the paper grid's "on" cells."""

GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's interaction: prompt style x counterfactual loss, for the paper's form
    # (hinge_head) and the offline default's (cf_background). Left out to keep the grid within
    # two hours on a 2-core CPU (add a cell here to measure them): hinge_pixels, the literal
    # hinge on the mean pixel embedding, which wrecks segmentation, and text_margin.
    "paper": {
        "rich/off": {"prompts.style": "rich", "train.cf_weight": 0.0},
        "rich/hinge_head": {
            "prompts.style": "rich",
            "train.cf_loss": "hinge_head",
            "train.cf_weight": CF_ON_WEIGHT,
        },
        "rich/cf_background": {
            "prompts.style": "rich",
            "train.cf_loss": "cf_background",
            "train.cf_weight": CF_ON_WEIGHT,
        },
        "plain/off": {"prompts.style": "plain", "train.cf_weight": 0.0},
        "plain/hinge_head": {
            "prompts.style": "plain",
            "train.cf_loss": "hinge_head",
            "train.cf_weight": CF_ON_WEIGHT,
        },
        "plain/cf_background": {
            "prompts.style": "plain",
            "train.cf_loss": "cf_background",
            "train.cf_weight": CF_ON_WEIGHT,
        },
    },
    # Mask quality: the model-free labeler vs the renderer's exact masks, the filter on vs off.
    "masks": {
        "difference/filter": {"label.backend": "difference", "filter.enabled": True},
        "difference/no-filter": {"label.backend": "difference", "filter.enabled": False},
        "oracle/filter": {"label.backend": "oracle", "filter.enabled": True},
        "oracle/no-filter": {"label.backend": "oracle", "filter.enabled": False},
    },
    # Category random sampling: filled in by grid() from the vocabulary (SAMPLING_K).
    "sampling": {},
}
"""Grid name -> cell name -> params overrides (dotted keys)."""

SAMPLING_K = (5, 25, 50, 100)
"""``train.num_sampled`` values of the sampling grid below the trainable classes, plus "all"
(the vocabulary size, which the trainer clamps to each seed's trainable classes). Where fewer
than 4 values result, :data:`SAMPLING_FILL` fills in."""
SAMPLING_FILL = (10, 15, 20)

DESCRIPTIONS = {
    "paper": f"prompt style x counterfactual loss (off, and each form on at weight {CF_ON_WEIGHT})",
    "sampling": "category random sampling: classes scored per image (train.num_sampled)",
    "masks": "mask quality: labeler (difference, oracle) x filter (on, off)",
}

METRICS: dict[str, tuple[str, str]] = {
    "seen": ("metrics/eval.json", "procedural.miou_seen"),
    "heldout": ("metrics/eval.json", "procedural.miou_heldout"),
    "heldout_combination": ("metrics/eval.json", "procedural.miou_heldout_combination"),
    "heldout_novel": ("metrics/eval.json", "procedural.miou_heldout_novel"),
    "k": ("metrics/train.json", "num_sampled_effective"),
    "label_miou": ("metrics/label.json", "oracle_miou"),
    "kept_ratio": ("metrics/filter.json", "kept_ratio"),
}
"""Metric name -> (metrics file, dotted key) read from each experiment; ``step_s`` (seconds
per training step, :func:`step_seconds`) comes on top. Missing ones are left out."""
STEP = "step_s"
LABELS = {
    "seen": "seen mIoU",
    "heldout": "held-out mIoU",
    "heldout_combination": "held-out (combination)",
    "heldout_novel": "held-out (novel)",
    "k": "K used",
    "label_miou": "labels vs exact",
    "kept_ratio": "kept",
    STEP: "s/step",
}
EFFECT_METRICS = ("seen", "heldout", "heldout_combination", "heldout_novel", STEP)
COLUMNS = {
    "paper": ("seen", "heldout", "heldout_combination", "heldout_novel", STEP),
    "sampling": ("k", "seen", "heldout", "heldout_combination", "heldout_novel", STEP),
    "masks": (
        "seen",
        "heldout",
        "heldout_combination",
        "heldout_novel",
        "label_miou",
        "kept_ratio",
    ),
}
"""Markdown and plot columns per grid (those no experiment has are left out)."""


@dataclass(frozen=True)
class Grid:
    """A named grid: ``cells`` (name -> overrides) and ``effects`` (name -> {cell:
    coefficient}, a linear combination of cell means)."""

    name: str
    cells: dict[str, dict[str, Any]]
    effects: dict[str, dict[str, int]]
    description: str = ""


def paper_effects(cells: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per form F: the loss's effect with rich prompts (rich/F - rich/off), with plain ones,
    and the interaction (the first minus the second); and rich - plain with the loss off."""
    forms = [c.split("/", 1)[1] for c in cells if c.startswith("rich/") and c != "rich/off"]
    out = {}
    for f in forms:
        out[f"cf_effect_rich/{f}"] = {f"rich/{f}": 1, "rich/off": -1}
        out[f"cf_effect_plain/{f}"] = {f"plain/{f}": 1, "plain/off": -1}
        out[f"interaction/{f}"] = {f"rich/{f}": 1, "rich/off": -1, f"plain/{f}": -1, "plain/off": 1}
    out["style_effect/off"] = {"rich/off": 1, "plain/off": -1}
    return out


MASK_EFFECTS: dict[str, dict[str, int]] = {
    "oracle_vs_difference/filter": {"oracle/filter": 1, "difference/filter": -1},
    "oracle_vs_difference/no-filter": {"oracle/no-filter": 1, "difference/no-filter": -1},
    "filter_effect/difference": {"difference/filter": 1, "difference/no-filter": -1},
    "filter_effect/oracle": {"oracle/filter": 1, "oracle/no-filter": -1},
    "interaction/filter_x_labeler": {
        "difference/filter": 1,
        "difference/no-filter": -1,
        "oracle/filter": -1,
        "oracle/no-filter": 1,
    },
}


EFFECTS: dict[str, dict[str, dict[str, int]]] = {
    "paper": paper_effects(list(GRIDS["paper"])),
    "masks": MASK_EFFECTS,
}
"""Grid name -> effect name -> {cell: coefficient} (the sampling grid's: from :func:`grid`)."""


def sampling_values(trainable: int) -> list[int]:
    """The sampling grid's K values below ``trainable`` (at least 3, so 4 with "all")."""
    ks = [k for k in SAMPLING_K if k < trainable]
    for k in SAMPLING_FILL:
        if len(ks) >= 3:
            break
        if k < trainable and k not in ks:
            ks.append(k)
    return sorted(ks)


def grid(name: str, vocabulary_size: int, trainable: int) -> Grid:
    """The grid ``name`` (``paper``, ``sampling``, ``masks``). ``vocabulary_size`` is the "all"
    of the sampling grid; ``trainable`` the fewest trainable classes over the seeds."""
    if name not in GRIDS:
        raise ConfigError(f"--grid: unknown grid {name!r} (available: {', '.join(GRIDS)}, all)")
    if name == "sampling":
        cells = {f"K={k}": {"train.num_sampled": k} for k in sampling_values(trainable)}
        cells["K=all"] = {"train.num_sampled": vocabulary_size}
        effects = {f"K={k}_vs_all": {f"K={k}": 1, "K=all": -1} for k in sampling_values(trainable)}
        return Grid(name, cells, effects, DESCRIPTIONS["sampling"])
    return Grid(name, GRIDS[name], EFFECTS.get(name, {}), DESCRIPTIONS.get(name, ""))


def slug(cell: str) -> str:
    """A cell name as a piece of an experiment name: ``rich/hinge_head`` -> ``rich-hinge-head``."""
    return re.sub(r"[^a-z0-9]+", "-", cell.lower()).strip("-")


def exp_name(grid_name: str, cell: str, seed: int) -> str:
    """The experiment of ``cell`` at ``seed``: ``abl-paper-rich-off-s0``."""
    return f"abl-{grid_name}-{slug(cell)}-s{seed}"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean`` and the sample standard deviation ``std`` (ddof 1; None below 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def combine(terms: dict[str, float], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A linear combination sum(c * mean) of cell summaries (:func:`summarize`), with its
    standard error sqrt(sum(c^2 * std^2 / n)) and ``exceeds_noise`` = |diff| > 2 se. A cell
    with fewer than 2 values leaves se and the call None (no diff without every cell)."""
    parts = [stats.get(cell) or {"n": 0} for cell in terms]
    if any(p["n"] == 0 for p in parts):
        return {"diff": None, "se": None, "exceeds_noise": None}
    diff = math.fsum(c * p["mean"] for c, p in zip(terms.values(), parts, strict=True))
    if any(p["n"] < 2 for p in parts):
        return {"diff": diff, "se": None, "exceeds_noise": None}
    var = math.fsum(
        c * c * p["std"] ** 2 / p["n"] for c, p in zip(terms.values(), parts, strict=True)
    )
    se = math.sqrt(var)
    return {"diff": diff, "se": se, "exceeds_noise": abs(diff) > 2 * se}


# --------------------------------------------------------------------------------------------
# one experiment's figures
# --------------------------------------------------------------------------------------------
STEP_LINE = re.compile(r"train: [\d.]+ s \((\d+) steps at ([\d.]+) s")


def step_seconds(log: str | None) -> float | None:
    """Seconds per training step of one experiment, from the train stage's own line in the
    experiment's log (``train: 412.3 s (1000 steps at 0.3981 s, validation 9.2 s)``, printed by
    :func:`magicseg.training.loop.train`; its ``timing.json`` stays in the experiment's
    temporary copy, and wall-clock is no metric). None where no line ran a step (a train stage
    the run cache restored, or a run rebuilt from its finished state)."""
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

    def read_log(self) -> str | None:
        if self.log is None or not self.log.is_file():
            return None
        return self.log.read_text(errors="replace")

    def values(self) -> dict[str, float]:
        """Every metric of :data:`METRICS` it has, and ``step_s`` where it can be found."""
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
    keep = []
    for base in sorted(bases):
        proc = subprocess.run(
            ["git", "diff", "--quiet", base, head, "--", *inputs], cwd=root, capture_output=True
        )
        if proc.returncode == 0:
            keep.append(base)
    return keep


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


def resolve_grids(names: Sequence[str], root: Path, seeds: Sequence[int]) -> list[Grid]:
    """The grids asked for (``all``: every one), the sampling grid's K values from the
    vocabulary of the composed params at each seed."""
    from magicseg.core.vocabulary import build_vocabulary

    wanted = list(GRIDS) if "all" in names else list(dict.fromkeys(names))
    for n in wanted:
        if n not in GRIDS:
            raise ConfigError(f"--grid: unknown grid {n!r} (available: {', '.join(GRIDS)}, all)")
    size = trainable = 0
    if "sampling" in wanted:
        p = parse_params(compose(root, {}), "params (composed from conf/)")
        vocabs = [build_vocabulary(**p.vocabulary.model_dump(), seed=s) for s in seeds]
        size, trainable = len(vocabs[0]), min(len(v.trainable) for v in vocabs)
    return [grid(n, size, trainable) for n in wanted]


def plan(grids: Sequence[Grid], seeds: Sequence[int], root: Path) -> list[Planned]:
    """Every (grid, cell, seed), its params composed and validated (a bad override is a
    ConfigError before any experiment runs)."""
    out = []
    for g in grids:
        names = [slug(c) for c in g.cells]
        if len(set(names)) != len(names):
            raise ConfigError(f"grid {g.name}: two cells share an experiment name ({names})")
        for cell, overrides in g.cells.items():
            base = compose(root, overrides)
            for seed in seeds:
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
    the same name and params (this commit's first), else one queued or running here. A
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
        active = [e for e in candidates if e.baseline == head and e.state in ("queued", "running")]
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


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def grid_results(
    g: Grid, planned: Sequence[Planned], seeds: Sequence[int], previous: dict[str, float]
) -> dict[str, Any]:
    """The ``metrics/ablations.json`` entry of one grid. ``previous``: experiment rev ->
    step_s from an earlier file, for experiments whose log no longer says it."""
    mine = [p for p in planned if p.grid == g.name]
    cells, stats_by_metric = {}, {}
    for cell, overrides in g.cells.items():
        runs = [p for p in mine if p.cell == cell and p.state == "done"]
        experiments, values = {}, {}
        for p in runs:
            experiments[str(p.seed)] = {"name": p.name, "rev": p.found.rev}
            v = p.found.values()
            if STEP not in v and p.found.rev in previous:
                v[STEP] = previous[p.found.rev]
            for metric, x in v.items():
                values.setdefault(metric, {})[str(p.seed)] = x
        metrics = {}
        for metric in [*METRICS, STEP]:
            if metric not in values:
                continue
            s = summarize(list(values[metric].values()))
            stats_by_metric.setdefault(metric, {})[cell] = s
            metrics[metric] = {
                "n": s["n"],
                "mean": _round(s["mean"]),
                "std": _round(s["std"]),
                "values": values[metric],
            }
        cells[cell] = {"overrides": overrides, "experiments": experiments, "metrics": metrics}
    effects = {}
    for name, terms in g.effects.items():
        per_metric = {}
        for metric in EFFECT_METRICS:
            if metric in stats_by_metric:
                c = combine(terms, stats_by_metric[metric])
                per_metric[metric] = {
                    "diff": _round(c["diff"]),
                    "se": _round(c["se"]),
                    "exceeds_noise": c["exceeds_noise"],
                }
        effects[name] = {"terms": terms, "metrics": per_metric}
    return {
        "command": f"magicseg ablate --grid {g.name} --seeds {','.join(map(str, seeds))}",
        "description": g.description,
        "seeds": list(seeds),
        "cells": cells,
        "effects": effects,
    }


def previous_steps(data: dict) -> dict[str, float]:
    """Experiment rev -> step_s in an earlier ``ablations.json``."""
    out = {}
    for g in (data.get("grids") or {}).values():
        for cell in (g.get("cells") or {}).values():
            steps = (cell.get("metrics") or {}).get(STEP, {}).get("values") or {}
            for seed, exp in (cell.get("experiments") or {}).items():
                if seed in steps:
                    out[exp["rev"]] = steps[seed]
    return out


def _fmt(metric: str, x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if metric == "k" else f"{x:.3f}"


def _present(g: dict, metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if any(m in c["metrics"] for c in g["cells"].values())]


def verdict(g: dict, metrics: Sequence[str]) -> str:
    """One sentence on a grid's effects: those beyond twice their standard error, or that none
    is (the table then says, in words, that the grid found no effect)."""
    found, untested = [], 0
    for ename, e in g["effects"].items():
        for m in metrics:
            r = e["metrics"].get(m)
            if r is None or r["diff"] is None:
                continue
            if r["exceeds_noise"] is None:
                untested += 1
            elif r["exceeds_noise"]:
                found.append(f"{ename} on {LABELS[m]} ({r['diff']:+.3f} ± {r['se']:.3f})")
    if found:
        text = "Beyond the noise (more than 2 SE): " + "; ".join(found) + "; the rest within it."
    elif any(e["metrics"] for e in g["effects"].values()):
        text = "No effect exceeds twice its standard error: every difference here is noise."
    else:
        text = "No effects yet (no cell has results)."
    if untested:
        text += f" {untested} difference(s) without a standard error (a cell with n < 2)."
    return text


def markdown(data: dict) -> str:
    """Markdown tables of every grid in ``data`` (the ``ablations.json`` content)."""
    out = []
    for name, g in data["grids"].items():
        cols = _present(g, COLUMNS.get(name, EFFECT_METRICS))
        title = f"### Grid `{name}`" + (f": {g['description']}" if g["description"] else "")
        out += [title, "", f"`{g['command']}`", ""]
        out.append("| cell | overrides | n | " + " | ".join(LABELS[m] for m in cols) + " |")
        out.append("|---|---|---|" + "---|" * len(cols))
        for cell, c in g["cells"].items():
            sets = " ".join(f"{k}={hydra_value(v)}" for k, v in c["overrides"].items())
            row = [cell, f"`{sets}`", str(len(c["experiments"]))]
            for m in cols:
                s = c["metrics"].get(m)
                if s is None:
                    row.append("–")
                elif s["std"] is None or m == "k":
                    row.append(_fmt(m, s["mean"]))
                else:
                    row.append(f"{_fmt(m, s['mean'])} ± {_fmt(m, s['std'])}")
            out.append("| " + " | ".join(row) + " |")
        ecols = _present(g, EFFECT_METRICS)
        out += ["", "| effect | difference of means | " + " | ".join(LABELS[m] for m in ecols)]
        out[-1] += " |"
        out.append("|---|---|" + "---|" * len(ecols))
        for ename, e in g["effects"].items():
            terms = " ".join(
                f"{'+' if c > 0 else '−'} {'' if abs(c) == 1 else abs(c)}{cell}"
                for cell, c in e["terms"].items()
            ).lstrip("+ ")
            row = [ename, terms]
            for m in ecols:
                r = e["metrics"].get(m)
                if r is None or r["diff"] is None:
                    row.append("–")
                    continue
                text = f"{r['diff']:+.3f}" + ("" if r["se"] is None else f" ± {r['se']:.3f}")
                row.append(f"**{text}**" if r["exceeds_noise"] else text)
            out.append("| " + " | ".join(row) + " |")
        out += ["", verdict(g, ecols), ""]
    out.append(
        "Cells: mean ± sample standard deviation over the seeds (n). Effects: a difference of "
        "cell means (an interaction: the difference of two differences) ± its standard error "
        "sqrt(Σ s²/n); **bold** where it exceeds twice its standard error (an effect), plain "
        "where it is within the noise."
    )
    return "\n".join(out) + "\n"


def plot_rows(g: dict, name: str) -> str:
    """The CSV of one grid's plot: cell, metric, mean, lo, hi (mean ± std), n."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "metric", "mean", "lo", "hi", "n"])
    for m in _present(g, COLUMNS.get(name, EFFECT_METRICS)):
        if m == "k":
            continue
        for cell, c in g["cells"].items():
            s = c["metrics"].get(m)
            if s is None:
                continue
            std = s["std"] or 0.0
            w.writerow(
                [
                    cell,
                    LABELS[m],
                    _round(s["mean"], 5),
                    _round(s["mean"] - std, 5),
                    _round(s["mean"] + std, 5),
                    s["n"],
                ]  # fmt: skip
            )
    return buf.getvalue()


def write_results(results: dict[str, dict], out: Path, table: Path, plots: Path) -> dict:
    """Merge the grids of ``results`` into ``out`` (other grids kept), then write the Markdown
    ``table`` and ``plots/<grid>.csv`` of every grid in it. Returns the merged content."""
    data = {"grids": {}}
    if out.is_file():
        try:
            data = json.loads(out.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{out}: not valid JSON (move it away and run again)") from None
    data.setdefault("grids", {}).update(results)
    data["grids"] = {k: data["grids"][k] for k in sorted(data["grids"])}
    with atomic_path(out) as tmp:  # keys unsorted: the grids' cell and effect order is the table's
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    with atomic_path(table) as tmp:
        tmp.write_text(markdown(data))
    for name, g in data["grids"].items():
        with atomic_path(plots / f"{name}.csv") as tmp:
            tmp.write_text(plot_rows(g, name))
    return data


@dataclass
class Outcome:
    """What :func:`ablate` did: the plan (with states), experiments queued, failures."""

    planned: list[Planned]
    queued: list[str]
    failed: list[Planned]
    data: dict | None = None
    ran: Counter = field(default_factory=Counter)
    cached: Counter = field(default_factory=Counter)


def ablate(
    grid_names: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    jobs: int = 1,
    dry_run: bool = False,
    out: Path = Path("metrics/ablations.json"),
    table: Path | None = None,
    plots: Path = Path("plots/ablations"),
    root: Path = Path("."),
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Run the grids through DVC's queue over ``seeds`` and write the results (see the module
    docstring). ``dry_run``: print the plan and the commands, queue nothing, write nothing."""
    # 1. Check the inputs before any work.
    root = Path(root)
    table = table or out.with_suffix(".md")
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{root.resolve()}: no dvc.yaml (run magicseg ablate in the repository)")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: give distinct seeds >= 0 (got {list(seeds)})")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1 (got {jobs})")
    ours = [os.path.relpath(Path(p).resolve(), root.resolve()) for p in (out, table, plots)]
    dirty = dirty_files(root, ours)
    if dirty and not dry_run:
        raise ConfigError(
            f"workspace: uncommitted changes to {', '.join(dirty[:5])}: commit or stash them "
            "first (queued experiments would run them, finished ones did not)"
        )

    # 2. The plan: every (grid, cell, seed) composed and validated; what exists already.
    grids = resolve_grids(grid_names, root, seeds)
    planned = plan(grids, seeds, root)
    head = head_commit(root)
    baselines = [head, *reusable_baselines(root, head)]
    exps = exp_show(root, baselines)
    match(planned, exps, head)
    todo = [p for p in planned if p.state == "to queue"]
    counts = Counter(p.state for p in planned)
    echo(
        f"ablate: {len(planned)} experiments ({', '.join(g.name for g in grids)} x seeds "
        f"{','.join(map(str, seeds))}): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
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
            echo(f"  {p.name:<44} {p.state}" + (f" (commit {where})" if where else ""))
        for p in todo:
            echo(f"  dvc exp run --queue -n {p.name} {' '.join(p.sets())}")
        return Outcome(planned, [], [])

    # 3. Queue what is missing, run the queue.
    for p in todo:
        _call([*DVC, "exp", "run", "--queue", "-n", p.name, *p.sets()], root, f"queue {p.name}")
    waiting = [p for p in planned if p.state != "done"]
    ran, cached = Counter(), Counter()
    if waiting:
        log = run_queue(root, jobs, len(waiting), root / QUEUE_LOG, echo)
        ran, cached = stage_counts(log)
        exps = exp_show(root, baselines)
        match(planned, exps, head)
        echo(
            "ablate: stages run: "
            + (", ".join(f"{s} {n}" for s, n in sorted(ran.items())) or "none")
            + "; restored from the run cache: "
            + (", ".join(f"{s} {n}" for s, n in sorted(cached.items())) or "none")
        )

    # 4. Collect and write; report what did not finish, with its log.
    previous = {}
    if out.is_file():
        try:
            previous = previous_steps(json.loads(out.read_text()))
        except json.JSONDecodeError:
            previous = {}
    results = {g.name: grid_results(g, planned, seeds, previous) for g in grids}
    data = write_results(results, out, table, plots)
    echo(f"ablate: wrote {out}, {table}, {plots}/")
    failed = [p for p in planned if p.state != "done"]
    for p in failed:
        echo(_failure(p, [e for e in exps if e.name == p.name]))
    return Outcome(planned, [p.name for p in todo], failed, data, ran, cached)


def _failure(p: Planned, exps: Sequence[Experiment]) -> str:
    """One experiment that did not finish, with the last lines of its log."""
    failed = sorted((e for e in exps if e.state == "failed"), key=lambda e: e.timestamp)
    if not failed:
        return f"{p.name}: not finished ({p.state})"
    log = failed[-1].read_log() or ""
    tail = [line for line in log.strip().splitlines() if line.strip()][-8:]
    body = "\n".join(f"    {line}" for line in tail)
    return f"{p.name}: failed (dvc queue logs {p.name}):\n{body}"
