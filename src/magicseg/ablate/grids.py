"""The grids of ``magicseg ablate``: named cells (params overrides), the effects measured between
them (contrasts of cells), the seeds each grid runs by default, and the metrics read from each
experiment. Pure data and small functions: no DVC, no torch."""

from __future__ import annotations

import itertools
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from magicseg.core.errors import ConfigError

CF_ON_WEIGHT = 0.5
"""``train.cf_weight`` of the paper grid's "on" cells."""

CF_FORMS = ("hinge_head", "cf_background", "text_margin")
"""Counterfactual-loss forms of the paper grid: the paper's (a hinge on a separate projection
head), the offline default's (the counterfactual's pixels as background) and an image-text
margin. ``hinge_pixels`` (the literal hinge on the mean pixel embedding, which wrecks
segmentation) is left out: add it here to measure it."""


def _paper_cells() -> dict[str, dict[str, Any]]:
    cells: dict[str, dict[str, Any]] = {}
    for style in ("rich", "plain"):
        cells[f"{style}/off"] = {"prompts.style": style, "train.cf_weight": 0.0}
        for form in CF_FORMS:
            cells[f"{style}/{form}"] = {
                "prompts.style": style,
                "train.cf_loss": form,
                "train.cf_weight": CF_ON_WEIGHT,
            }
    return cells


LABELERS = ("oracle", "grounded_proxy", "difference")
"""The masks grid's labelers: the renderer's exact masks (``oracle``), a single-image labeler
(``grounded_proxy``: it sees the positive image only, like Grounded-SAM) and the model-free
difference labeler (positive vs counterfactual)."""


def _mask_cells() -> dict[str, dict[str, Any]]:
    return {
        f"{lab}/{'filter' if on else 'no-filter'}": {"label.backend": lab, "filter.enabled": on}
        for lab in LABELERS
        for on in (True, False)
    }


SPREAD_FIXED = {"vocabulary.holdout_seed": 0, "evaluate.test_seed": 0}
"""The spread grid's held-out draw and test set: seed 0's, for every seed."""

SPREAD_CELLS: dict[str, dict[str, Any]] = {
    "fixed": dict(SPREAD_FIXED),
    "fixed/threads=2": {**SPREAD_FIXED, "train.num_threads": 2},
    "fixed/bf16": {**SPREAD_FIXED, "train.precision": "bf16"},
}
"""The spread grid's cells: ``fixed``, the default with the held-out classes and the test set
fixed at seed 0's draw (the held-out words and the test images stay; the prompts, images,
labels and training follow the seed); the same trained at two threads instead of one
(``ablate`` runs each job at ``OMP_NUM_THREADS`` = cores / jobs; ``train.num_threads`` sets
the trainer's); and the same in bf16 autocast instead of fp32 (``train.precision: auto`` is
fp32 on a CPU; bf16's kernels differ between CPUs). ``fixed``'s seed 0 is the default's run.
The default as it is (each seed draws its own held-out classes and test set) is the paper
grid's ``rich/off`` cell, on the same seeds. ``fixed``'s spread over seeds is the noise a
``dvc metrics diff`` at one seed is read against: both sides of such a diff score the same
held-out words on the same test set. The thread count's and the precision's paired effects
are how far each moves the same run."""

SPREAD_EFFECTS: dict[str, dict[str, int]] = {
    "threads_2_vs_1": {"fixed/threads=2": 1, "fixed": -1},
    "bf16_vs_fp32": {"fixed/bf16": 1, "fixed": -1},
}
"""The thread count's effect on the same seed (the trainer's reductions run in another order)
and bf16 autocast's."""

GRIDS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's interaction: prompt style x counterfactual loss, for every form of CF_FORMS.
    "paper": _paper_cells(),
    # Mask quality: exact masks, a single-image labeler and the difference labeler, filter on/off.
    "masks": _mask_cells(),
    # Category random sampling: filled in by grid() from the vocabulary (SAMPLING_K).
    "sampling": {},
    # The default's spread over seeds with the held-out classes and the test set fixed.
    "spread": SPREAD_CELLS,
}
"""Grid name -> cell name -> params overrides (dotted keys)."""

DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {
    "paper": (0, 1, 2, 3, 4),
    "sampling": (0, 1, 2),
    "masks": (0, 1, 2),
    "spread": (0, 1, 2, 3, 4),
}
"""The seeds a grid runs on when ``--seeds`` is not given (every cell on the same seeds, so
that effects are paired); other grids: 0, 1, 2."""

SAMPLING_K = (5, 25, 50, 100)
"""``train.num_sampled`` values of the sampling grid below the trainable classes, plus "all"
(the vocabulary size, which the trainer clamps to each seed's trainable classes). Where fewer
than 4 values result, :data:`SAMPLING_FILL` fills in."""
SAMPLING_FILL = (10, 15, 20)

DESCRIPTIONS = {
    "paper": (
        f"prompt style x counterfactual loss (off, and each form on at weight {CF_ON_WEIGHT})"
    ),
    "sampling": "category random sampling: classes scored per image (train.num_sampled)",
    "masks": "mask quality: labeler (exact masks, single-image, difference) x filter (on, off)",
    "spread": (
        "the default's spread over seeds with the held-out classes and the test set fixed at "
        "seed 0's (the paper grid's rich/off cell draws them per seed; fixed's std is the "
        "answer), and the same trained at two threads instead of one and in bf16 instead of fp32"
    ),
}

METRICS: dict[str, tuple[str, str]] = {
    "seen": ("metrics/eval.json", "procedural.miou_seen"),
    "heldout": ("metrics/eval.json", "procedural.miou_heldout"),
    "heldout_combination": ("metrics/eval.json", "procedural.miou_heldout_combination"),
    "heldout_novel": ("metrics/eval.json", "procedural.miou_heldout_novel"),
    "k": ("metrics/train.json", "num_sampled_effective"),
    "label_miou": ("metrics/label.json", "oracle_miou"),
    "kept_ratio": ("metrics/filter.json", "kept_ratio"),
    "cf_fg": ("metrics/eval.json", "procedural.cf_fg_rate"),
}
"""Metric name -> (metrics file, dotted key) read from each experiment; ``step_s`` (seconds
per training step) comes on top. Missing ones are left out."""
STEP = "step_s"
LABELS = {
    "seen": "seen mIoU",
    "heldout": "held-out mIoU",
    "heldout_combination": "held-out (combination)",
    "heldout_novel": "held-out (novel)",
    "k": "K used",
    "label_miou": "labels vs exact",
    "kept_ratio": "kept",
    "cf_fg": "cf pixels called a class",
    STEP: "s/step",
}
EFFECT_METRICS = ("seen", "heldout", "heldout_combination", "heldout_novel", "cf_fg", STEP)
COLUMNS = {
    "paper": ("seen", "heldout", "heldout_combination", "heldout_novel", "cf_fg", STEP),
    "sampling": ("k", "seen", "heldout", "heldout_combination", "heldout_novel", STEP),
    "masks": (
        "seen",
        "heldout",
        "heldout_combination",
        "heldout_novel",
        "label_miou",
        "kept_ratio",
    ),
    "spread": ("seen", "heldout", "heldout_combination", "heldout_novel", "cf_fg"),
}
"""Markdown and plot columns per grid (those no experiment has are left out)."""


@dataclass(frozen=True)
class Grid:
    """A named grid: ``cells`` (name -> overrides), ``effects`` (name -> {cell: coefficient},
    a contrast of cells), the ``seeds`` it runs by default and the cells ``refused`` (name ->
    why: a backend this version does not have), which neither run nor enter an effect."""

    name: str
    cells: dict[str, dict[str, Any]]
    effects: dict[str, dict[str, int]]
    description: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    refused: dict[str, str] = field(default_factory=dict)


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


def mask_effects(labelers: Sequence[str] = LABELERS) -> dict[str, dict[str, int]]:
    """Each labeler but the exact masks against them (filter on and off), the filter's effect
    per labeler, and per labeler the interaction filter x (labeler vs exact masks)."""
    out: dict[str, dict[str, int]] = {}
    others = [lab for lab in labelers if lab != "oracle"]
    for lab in others:
        for f in ("filter", "no-filter"):
            out[f"{lab}_vs_exact/{f}"] = {f"{lab}/{f}": 1, f"oracle/{f}": -1}
    for lab in labelers:
        out[f"filter_effect/{lab}"] = {f"{lab}/filter": 1, f"{lab}/no-filter": -1}
    for lab in others:
        out[f"interaction/filter_x_{lab}"] = {
            f"{lab}/filter": 1,
            f"{lab}/no-filter": -1,
            "oracle/filter": -1,
            "oracle/no-filter": 1,
        }
    return out


EFFECTS: dict[str, dict[str, dict[str, int]]] = {
    "paper": paper_effects(list(GRIDS["paper"])),
    "masks": mask_effects(),
    "spread": SPREAD_EFFECTS,
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


def sampling_effects(ks: Sequence[int]) -> dict[str, dict[str, int]]:
    """Each K against all (``K=5_vs_all``), and each step up from the next smaller K
    (``K=25_vs_K=5``, ..., ``K=all_vs_K=100``): where the steps stop paying is how large K must
    be, and they stay measurable when the costly "all" cell has not run."""
    names = [f"K={k}" for k in sorted(ks)] + ["K=all"]
    effects = {f"{c}_vs_all": {c: 1, "K=all": -1} for c in names[:-1]}
    for lo, hi in itertools.pairwise(names):
        effects[f"{hi}_vs_{lo}"] = {hi: 1, lo: -1}
    return effects


def known_backends() -> dict[str, tuple[str, ...]]:
    """Dotted params key -> the values the params classes accept, for the backend keys a cell
    may name that this version may not have (``label.backend``)."""
    from magicseg.core.config import LabelParams

    allowed = typing.get_args(LabelParams.model_fields["backend"].annotation)
    return {"label.backend": tuple(allowed)}


def refusals(cells: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Cell -> why it cannot run here: it names a backend the params classes do not know
    (one being built elsewhere, say). Any other bad value stays an error of the whole plan."""
    known = known_backends()
    out = {}
    for cell, overrides in cells.items():
        for key, allowed in known.items():
            if key in overrides and overrides[key] not in allowed:
                out[cell] = (
                    f"{key}: {overrides[key]!r} is not a backend of this version "
                    f"(available: {', '.join(allowed)})"
                )
    return out


def grid(name: str, vocabulary_size: int, trainable: int) -> Grid:
    """The grid ``name`` (``paper``, ``sampling``, ``masks``, ``spread``). ``vocabulary_size``
    is the "all" of the sampling grid; ``trainable`` the fewest trainable classes over the
    seeds. Cells that name an unknown backend (:func:`refusals`) are left out with their
    effects."""
    if name not in GRIDS:
        raise ConfigError(f"--grid: unknown grid {name!r} (available: {', '.join(GRIDS)}, all)")
    seeds = DEFAULT_SEEDS.get(name, (0, 1, 2))
    if name == "sampling":
        ks = sampling_values(trainable)
        cells = {f"K={k}": {"train.num_sampled": k} for k in ks}
        cells["K=all"] = {"train.num_sampled": vocabulary_size}
        effects = sampling_effects(ks)
        return Grid(name, cells, effects, DESCRIPTIONS["sampling"], seeds)
    cells, effects = GRIDS[name], EFFECTS.get(name, {})
    refused = refusals(cells)
    if refused:
        cells = {c: o for c, o in cells.items() if c not in refused}
        effects = {e: t for e, t in effects.items() if not set(t) & set(refused)}
    return Grid(name, cells, effects, DESCRIPTIONS.get(name, ""), seeds, refused)


def slug(cell: str) -> str:
    """A cell name as a piece of an experiment name: ``rich/hinge_head`` -> ``rich-hinge-head``."""
    return re.sub(r"[^a-z0-9]+", "-", cell.lower()).strip("-")


def exp_name(grid_name: str, cell: str, seed: int) -> str:
    """The experiment of ``cell`` at ``seed``: ``abl-paper-rich-off-s0``."""
    return f"abl-{grid_name}-{slug(cell)}-s{seed}"
