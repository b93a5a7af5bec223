"""The results of ``magicseg ablate``: ``metrics/ablations.json`` (per grid, per cell the
per-seed values and their mean and std; per effect the paired statistics of
:mod:`magicseg.ablate.stats`), ``metrics/ablations.md`` (the same as Markdown tables) and
``plots/ablations/<grid>.csv``. Every figure of the table and the plot is computed from the
per-seed values in the JSON (:func:`rereport` recomputes them from the file alone)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magicseg.ablate.grids import COLUMNS, EFFECT_METRICS, LABELS, METRICS, STEP, Grid
from magicseg.ablate.queue import Planned, hydra_value
from magicseg.ablate.stats import contrast, summarize
from magicseg.core.errors import DataError
from magicseg.core.io import atomic_path


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def cell_metrics(values: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """metric -> {n, mean, std, values} from metric -> seed -> value (metrics in the order of
    :data:`METRICS`, then ``step_s``, then any other)."""
    order = [m for m in [*METRICS, STEP] if m in values] + [
        m for m in values if m not in METRICS and m != STEP
    ]
    out = {}
    for metric in order:
        s = summarize(list(values[metric].values()))
        out[metric] = {
            "n": s["n"],
            "mean": _round(s["mean"]),
            "std": _round(s["std"]),
            "values": values[metric],
        }
    return out


def effect_metrics(terms: dict[str, int], cells: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per metric of :data:`EFFECT_METRICS` some cell has: the contrast ``terms`` from the
    cells' per-seed values (:func:`magicseg.ablate.stats.contrast`: paired over the shared
    seeds; unpaired only where the cells share fewer than 2)."""
    out = {}
    for metric in EFFECT_METRICS:
        values = {
            cell: (cells.get(cell, {}).get("metrics", {}).get(metric) or {}).get("values") or {}
            for cell in terms
        }
        if not any(values.values()):
            continue
        c = contrast(terms, values)
        out[metric] = {
            "diff": _round(c["diff"]),
            "ci95": None if c["ci95"] is None else [_round(x) for x in c["ci95"]],
            "n": c["n"],
            "se": _round(c["se"]),
            "df": c["df"],
            "paired": c["paired"],
            "exceeds_noise": c["exceeds_noise"],
        }
    return out


def grid_results(g: Grid, planned: Sequence[Planned], previous: dict[str, float]) -> dict[str, Any]:
    """The ``metrics/ablations.json`` entry of one grid. ``previous``: experiment rev ->
    step_s from an earlier file, for experiments whose log no longer says it."""
    mine = [p for p in planned if p.grid == g.name]
    cells = {}
    for cell, overrides in g.cells.items():
        runs = [p for p in mine if p.cell == cell and p.state == "done"]
        experiments, values = {}, {}
        for p in runs:
            experiments[str(p.seed)] = {
                "name": p.name,
                "rev": p.found.rev,
                "baseline": p.found.baseline,
            }
            v = p.found.values()
            if STEP not in v and p.found.rev in previous:
                v[STEP] = previous[p.found.rev]
            for metric, x in v.items():
                values.setdefault(metric, {})[str(p.seed)] = x
        cells[cell] = {
            "overrides": overrides,
            "experiments": experiments,
            "metrics": cell_metrics(values),
        }
    effects = {
        name: {"terms": terms, "metrics": effect_metrics(terms, cells)}
        for name, terms in g.effects.items()
    }
    out = {
        "command": f"magicseg ablate --grid {g.name} --seeds {','.join(map(str, g.seeds))}",
        "description": g.description,
        "seeds": list(g.seeds),
        "cells": cells,
        "effects": effects,
    }
    if g.refused:
        out["refused"] = dict(g.refused)
    return out


def rereport(g: dict) -> dict:
    """A grid entry of ``ablations.json`` with every cell statistic and effect recomputed from
    its per-seed values and effect terms (``magicseg ablate --report-only``)."""
    out = dict(g)
    out["cells"] = {}
    for cell, c in g["cells"].items():
        values = {m: dict(s.get("values") or {}) for m, s in (c.get("metrics") or {}).items()}
        out["cells"][cell] = {**c, "metrics": cell_metrics(values)}
    out["effects"] = {
        name: {"terms": e["terms"], "metrics": effect_metrics(e["terms"], out["cells"])}
        for name, e in g["effects"].items()
    }
    return out


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


def _effect_columns(g: dict) -> list[str]:
    """The effect metrics some effect has a value of (a metric only one cell has, a new one
    the older cells lack, gives none); all the cells' ones where no effect has any yet."""
    present = _present(g, EFFECT_METRICS)
    valued = [
        m
        for m in present
        if any((e["metrics"].get(m) or {}).get("diff") is not None for e in g["effects"].values())
    ]
    return valued or present


def bound(x: float) -> str:
    """An interval end to 3 decimals, or to more (up to 6) where 3 would print a signed zero
    (an interval that just excludes 0 must not read as reaching it)."""
    for digits in (3, 4, 5, 6):
        text = f"{x:+.{digits}f}"
        if x == 0 or float(text) != 0:
            break
    return text


def effect_text(r: dict) -> str:
    """One effect on one metric: ``+0.095 [+0.010, +0.180]`` (the 95% interval), ``(unpaired)``
    where the cells share no seeds, bold where the interval excludes 0."""
    text = f"{r['diff']:+.3f}"
    if r.get("ci95") is not None:
        lo, hi = r["ci95"]
        text += f" [{bound(lo)}, {bound(hi)}]"
    if r.get("paired") is False:
        text += " (unpaired)"
    return f"**{text}**" if r.get("exceeds_noise") else text


def verdict(g: dict, metrics: Sequence[str]) -> str:
    """One sentence on a grid's effects: those whose 95% interval excludes 0, or that none
    does (the table then says, in words, that the grid found no effect)."""
    found, untested = [], 0
    for ename, e in g["effects"].items():
        for m in metrics:
            r = e["metrics"].get(m)
            if r is None or r["diff"] is None:
                continue
            if r["exceeds_noise"] is None:
                untested += 1
            elif r["exceeds_noise"]:
                lo, hi = r["ci95"]
                found.append(
                    f"{ename} on {LABELS[m]} ({r['diff']:+.3f} [{bound(lo)}, {bound(hi)}])"
                )
    if found:
        text = (
            "Beyond the noise (95% interval excludes 0): " + "; ".join(found) + "; the rest "
            "within it."
        )
    elif any(e["metrics"] for e in g["effects"].values()):
        text = "No effect's 95% interval excludes 0: every difference here is within the noise."
    else:
        text = "No effects yet (no cell has results)."
    if untested:
        text += f" {untested} difference(s) without an interval (fewer than 2 seeds)."
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
            row = [cell, f"`{sets}`" if sets else "none (the default)", str(len(c["experiments"]))]
            for m in cols:
                s = c["metrics"].get(m)
                if s is None:
                    row.append("–")
                elif s["std"] is None or m == "k":
                    row.append(_fmt(m, s["mean"]))
                else:
                    row.append(f"{_fmt(m, s['mean'])} ± {_fmt(m, s['std'])}")
            out.append("| " + " | ".join(row) + " |")
        for cell, why in (g.get("refused") or {}).items():
            out.append(f"| {cell} | refused: {why} | 0 |" + " – |" * len(cols))
        if not g["effects"]:  # a grid that measures spread, not contrasts
            out += [
                "",
                "No effects: this grid's answer is its cells' standard deviation over the seeds.",
                "",
            ]
            continue
        ecols = _effect_columns(g)
        out += ["", "| effect | contrast | n | " + " | ".join(LABELS[m] for m in ecols) + " |"]
        out.append("|---|---|---|" + "---|" * len(ecols))
        for ename, e in g["effects"].items():
            terms = " ".join(
                f"{'+' if c > 0 else '−'} {'' if abs(c) == 1 else abs(c)}{cell}"
                for cell, c in e["terms"].items()
            ).lstrip("+ ")
            ns = sorted({r["n"] for r in e["metrics"].values() if r["diff"] is not None})
            row = [ename, terms, "/".join(map(str, ns)) or "0"]
            for m in ecols:
                r = e["metrics"].get(m)
                row.append("–" if r is None or r["diff"] is None else effect_text(r))
            out.append("| " + " | ".join(row) + " |")
        out += ["", verdict(g, ecols), ""]
    out.append(
        "Cells: mean ± sample standard deviation over the seeds (n). Effects: every cell runs on "
        "the same seeds, so an effect is the mean over the seeds (n) of its per-seed contrast "
        "(a difference of cells; an interaction: the difference of two differences) with its "
        "95% Student t-interval [low, high]; **bold** where the interval excludes 0 (an "
        "effect), plain where it is within the noise. `(unpaired)`: cells that share fewer "
        "than 2 seeds, compared by their means (Welch interval). An effect's n reads `2/3` "
        "where its metrics have different counts of seeds (a step time is missing where an "
        "experiment trained nothing: its train stage was up to date in the baseline's "
        "`dvc.lock` or restored from the run cache, and printed no timing)."
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


def read_results(out: Path) -> dict:
    """The content of ``out`` (``{"grids": {}}`` where it does not exist)."""
    if not out.is_file():
        return {"grids": {}}
    try:
        return json.loads(out.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{out}: not valid JSON (move it away and run again)") from None


def write_results(results: dict[str, dict], out: Path, table: Path, plots: Path) -> dict:
    """Merge the grids of ``results`` into ``out`` (other grids kept), then write the Markdown
    ``table`` and ``plots/<grid>.csv`` of every grid in it. Returns the merged content."""
    data = read_results(out)
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
