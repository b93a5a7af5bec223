"""``magicseg ablate``: named grids of DVC experiments, every cell on the same seeds, effects
as paired differences with 95% t-intervals, one table.

A grid is a set of named cells, each a few params overrides (:mod:`.grids`). Every (cell, seed)
is one DVC experiment, ``dvc exp run --queue -n abl-<grid>-<cell>-s<seed> -S seed=<seed> -S
key=value ...``, run by DVC's queue in a temporary copy of the repository (the workspace is
never touched; :mod:`.queue`). Experiments that share their data stages (same seed, same data
params) share them through DVC's run cache. A re-run finds the finished experiments by name in
``dvc exp show --json`` (the current commit's, and those of earlier commits where no file a
stage depends on has changed since) and queues only the rest.

Then it collects every experiment's metrics and writes (:mod:`.report`, :mod:`.stats`):

- ``metrics/ablations.json``: per grid, per cell, the overrides, the experiments, and per metric
  ``n``, ``mean``, ``std`` (sample, ddof 1) and the per-seed ``values``; per grid the named
  effects (contrasts of cells: a difference, or the difference of two differences for an
  interaction), per metric ``diff`` (the mean of the per-seed contrasts), ``n`` (the seeds the
  cells share), ``se``, ``df``, ``ci95`` (the 95% Student t-interval), ``paired`` and
  ``exceeds_noise`` (the interval excludes 0);
- ``metrics/ablations.md``: the same as Markdown tables;
- ``plots/ablations/<grid>.csv``: cell, metric, mean, lo, hi, n (bars with error bars: the
  ``plots/ablations`` plot of ``dvc.yaml``, template ``.dvc/plots/bars_error.json``).

``magicseg ablate --report-only`` recomputes the tables from the per-seed values of an existing
``metrics/ablations.json`` (:func:`.runner.report_only`); ``--collect`` writes them from the
experiments that have finished, queueing nothing.
"""

from magicseg.ablate.grids import (
    CF_ON_WEIGHT,
    COLUMNS,
    DEFAULT_SEEDS,
    DESCRIPTIONS,
    EFFECT_METRICS,
    EFFECTS,
    GRIDS,
    LABELS,
    METRICS,
    SAMPLING_FILL,
    SAMPLING_K,
    STEP,
    Grid,
    exp_name,
    grid,
    mask_effects,
    paper_effects,
    refusals,
    sampling_effects,
    sampling_values,
    slug,
)
from magicseg.ablate.queue import (
    Experiment,
    Planned,
    compose,
    dotted,
    hydra_value,
    match,
    parse_exp_show,
    plan,
    resolve_grids,
    stage_counts,
    step_seconds,
)
from magicseg.ablate.report import (
    grid_results,
    markdown,
    plot_rows,
    previous_steps,
    rereport,
    verdict,
    write_results,
)
from magicseg.ablate.runner import Outcome, ablate, report_only
from magicseg.ablate.stats import (
    contrast,
    paired_contrast,
    summarize,
    t_central,
    t_quantile,
    unpaired_contrast,
)

__all__ = [
    "CF_ON_WEIGHT",
    "COLUMNS",
    "DEFAULT_SEEDS",
    "DESCRIPTIONS",
    "EFFECTS",
    "EFFECT_METRICS",
    "GRIDS",
    "LABELS",
    "METRICS",
    "SAMPLING_FILL",
    "SAMPLING_K",
    "STEP",
    "Experiment",
    "Grid",
    "Outcome",
    "Planned",
    "ablate",
    "compose",
    "contrast",
    "dotted",
    "exp_name",
    "grid",
    "grid_results",
    "hydra_value",
    "markdown",
    "mask_effects",
    "match",
    "paired_contrast",
    "paper_effects",
    "parse_exp_show",
    "plan",
    "plot_rows",
    "previous_steps",
    "refusals",
    "report_only",
    "rereport",
    "resolve_grids",
    "sampling_effects",
    "sampling_values",
    "slug",
    "stage_counts",
    "step_seconds",
    "summarize",
    "t_central",
    "t_quantile",
    "unpaired_contrast",
    "verdict",
    "write_results",
]
