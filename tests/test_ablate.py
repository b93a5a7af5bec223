"""``magicseg ablate``: the statistics on known numbers, the grid definitions against the params
classes, and a tiny grid (2 cells x 2 seeds) run for real through DVC's queue on a miniature
copy of the project: results equal a hand computation from ``dvc exp show --json``, the data
stages are shared between the cells of a seed, a re-run queues nothing and writes the same
file, the plot and the table are written, the workspace is untouched."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.test_end_to_end import GIT_ID, MINI, _merge
from typer.testing import CliRunner

from magicseg import ablate as A
from magicseg.cli import app
from magicseg.core.config import Params, Section, parse_params
from magicseg.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
runner = CliRunner()


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def test_summarize_known_numbers():
    s = A.summarize([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert A.summarize([0.4]) == {"n": 1, "mean": 0.4, "std": None}
    assert A.summarize([]) == {"n": 0, "mean": None, "std": None}
    assert A.summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])["std"] == pytest.approx(
        math.sqrt(32 / 7)
    )


@pytest.mark.parametrize(
    ("df", "t"),  # t_{0.975, df} as printed in any table of Student's t (not from scipy)
    [
        (1, 12.706),
        (2, 4.303),
        (3, 3.182),
        (4, 2.776),
        (5, 2.571),
        (9, 2.262),
        (29, 2.045),
        (1000, 1.962),
    ],  # fmt: skip
)
def test_t_quantiles_are_the_tables(df, t):
    assert A.t_quantile(df) == pytest.approx(t, abs=6e-4)
    assert A.t_central(A.t_quantile(df), df) == pytest.approx(0.95, abs=1e-9)


def test_interval_ends_never_print_as_a_signed_zero():
    assert A.report.bound(-0.00049) == "-0.0005" and A.report.bound(0.0312) == "+0.031"
    assert A.report.bound(0.0) == "+0.000"
    assert A.report.bound(-0.000036) == "-0.00004" and A.report.bound(1e-9) == "+0.000000"
    r = {"diff": -0.141, "ci95": [-0.282, -0.0004], "paired": True, "exceeds_noise": True}
    assert A.report.effect_text(r) == "**-0.141 [-0.282, -0.0004]**"


def test_t_central_known_points():
    assert A.t_central(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| < 1) = 1/2
    assert A.t_central(0.0, 3) == 0.0
    # df 2 has a closed form: P(|T| < t) = t / sqrt(2 + t^2)
    assert A.t_central(1.5, 2) == pytest.approx(1.5 / math.sqrt(2 + 1.5**2))
    assert A.t_quantile(4, level=0.90) == pytest.approx(2.132, abs=6e-4)


def test_a_paired_effect_is_the_mean_of_per_seed_differences_with_a_t_interval():
    # the seeds move both cells together (0.5, 0.7, 0.6); "on" is 0.02-0.04 above "off"
    values = {
        "on": {"0": 0.53, "1": 0.72, "2": 0.64},
        "off": {"0": 0.50, "1": 0.70, "2": 0.60},
    }
    c = A.paired_contrast({"on": 1, "off": -1}, values)
    # per seed: 0.03, 0.02, 0.04 -> mean 0.03, sd 0.01, se 0.01 / sqrt(3), t(2) = 4.3027
    se = 0.01 / math.sqrt(3)
    assert c["paired"] is True and c["n"] == 3 and c["df"] == 2
    assert c["diff"] == pytest.approx(0.03) and c["se"] == pytest.approx(se)
    assert c["ci95"] == pytest.approx([0.03 - 4.3027 * se, 0.03 + 4.3027 * se], abs=1e-5)
    assert c["ci95"][0] == pytest.approx(0.00516, abs=1e-5) and c["exceeds_noise"] is True
    # the same cells unpaired: the seed spread (sd 0.1) swamps the 0.03
    stats = {k: A.summarize(list(v.values())) for k, v in values.items()}
    u = A.unpaired_contrast({"on": 1, "off": -1}, stats)
    assert u["paired"] is False and u["diff"] == pytest.approx(0.03)
    assert u["se"] == pytest.approx(math.sqrt((stats["on"]["std"] ** 2 + 0.1**2) / 3))
    assert u["exceeds_noise"] is False
    # a difference that flips sign between seeds is noise
    flip = {"on": {"0": 0.53, "1": 0.68, "2": 0.64}, "off": values["off"]}
    assert A.paired_contrast({"on": 1, "off": -1}, flip)["exceeds_noise"] is False


def test_a_paired_interaction_uses_the_four_cells_of_each_seed():
    values = {
        "rich/on": {"0": 0.62, "1": 0.64},
        "rich/off": {"0": 0.58, "1": 0.60},
        "plain/on": {"0": 0.40, "1": 0.50},
        "plain/off": {"0": 0.55, "1": 0.57},
    }
    terms = {"rich/on": 1, "rich/off": -1, "plain/on": -1, "plain/off": 1}
    c = A.paired_contrast(terms, values)
    # seed 0: 0.04 + 0.15 = 0.19; seed 1: 0.04 + 0.07 = 0.11 -> mean 0.15, sd 0.0566, t(1)
    sd = statistics.stdev([0.19, 0.11])
    assert c["diff"] == pytest.approx(0.15) and c["se"] == pytest.approx(sd / math.sqrt(2))
    half = 12.7062 * sd / math.sqrt(2)
    assert c["ci95"] == pytest.approx([0.15 - half, 0.15 + half], abs=1e-4)
    assert c["exceeds_noise"] is False  # 2 seeds: t(1) = 12.7 makes a wide interval


def test_pairing_uses_the_shared_seeds_and_falls_back_only_without_them():
    values = {"a": {"0": 0.5, "1": 0.6, "2": 0.7}, "b": {"0": 0.4, "1": 0.45}}
    c = A.contrast({"a": 1, "b": -1}, values)
    assert c["paired"] is True and c["n"] == 2  # seed 2 of a has no partner
    assert c["diff"] == pytest.approx((0.1 + 0.15) / 2)
    # no shared seeds: unpaired, with a Welch interval
    apart = {"a": values["a"], "b": {"3": 0.4, "4": 0.45}}
    u = A.contrast({"a": 1, "b": -1}, apart)
    assert u["paired"] is False and u["diff"] == pytest.approx(0.6 - 0.425)
    v1, v2 = 0.01 / 3, statistics.variance([0.4, 0.45]) / 2
    df = int((v1 + v2) ** 2 / (v1**2 / 2 + v2**2 / 1))
    assert u["df"] == df and u["se"] == pytest.approx(math.sqrt(v1 + v2))
    # one shared seed and a cell with one value: a difference, no interval
    one = {"a": {"0": 0.5}, "b": {"0": 0.3, "1": 0.4}}
    assert A.contrast({"a": 1, "b": -1}, one) | {"seeds": None} == {
        "paired": True, "n": 1, "seeds": None, "diff": pytest.approx(0.2), "se": None,
        "df": None, "ci95": None, "exceeds_noise": None}  # fmt: skip
    assert A.contrast({"a": 1, "c": -1}, one)["diff"] is None


def test_step_time_from_the_train_stages_log_line():
    log = "Running stage 'train':\ntrain: 41.2 s (1000 steps at 0.0391 s, validation 1.2 s)\n"
    assert A.step_seconds(log) == 0.0391
    assert A.step_seconds(log + "train: 0.4 s (0 steps at 0.0 s, validation 0.0 s)\n") == 0.0391
    assert A.step_seconds("Stage 'train' is cached") is None
    assert A.step_seconds(None) is None


# --------------------------------------------------------------------------------------------
# the grids
# --------------------------------------------------------------------------------------------
def _leaf_keys(cls=Params, prefix=""):
    out = set()
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out |= _leaf_keys(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


@pytest.mark.parametrize("name", ["paper", "masks", "sampling", "spread"])
def test_every_override_is_a_param_and_validates(name):
    g = A.grid(name, vocabulary_size=48, trainable=40)
    keys = _leaf_keys()
    defaults = Params().model_dump(mode="json")
    assert len(g.cells) >= (1 if name == "spread" else 4)
    for cell, overrides in g.cells.items():
        assert set(overrides) <= keys, (cell, set(overrides) - keys)
        data = json.loads(json.dumps(defaults))
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[leaf] = value
        parse_params(data, f"{name}/{cell}")  # a value the params classes refuse raises
    for effect, terms in g.effects.items():
        assert set(terms) <= set(g.cells), effect
        assert sum(terms.values()) == 0, effect  # a contrast: equal cells give 0
    names = [A.exp_name(name, c, 12) for c in g.cells]
    assert len(set(names)) == len(names)
    for n in names:  # DVC names experiments with git refs
        subprocess.run(["git", "check-ref-format", f"refs/exps/{n}"], check=True)


def test_the_paper_grid_crosses_style_and_every_loss_form_kept():
    g = A.grid("paper", 48, 40)
    forms = {c.split("/")[1] for c in g.cells} - {"off"}
    assert forms == {"hinge_head", "cf_background", "text_margin"}
    assert len(g.cells) == 8 and g.seeds == (0, 1, 2, 3, 4)
    for style in ("rich", "plain"):
        assert g.cells[f"{style}/off"]["train.cf_weight"] == 0
        for f in forms:
            cell = g.cells[f"{style}/{f}"]
            assert cell["prompts.style"] == style and cell["train.cf_loss"] == f
            assert cell["train.cf_weight"] > 0
    for f in forms:
        assert g.effects[f"interaction/{f}"] == {
            f"rich/{f}": 1,
            "rich/off": -1,
            f"plain/{f}": -1,
            "plain/off": 1,
        }


def test_the_masks_grid_refuses_an_unknown_labeler_cleanly(monkeypatch):
    g = A.grid("masks", 48, 40)  # every labeler of the grid is a backend of this version
    assert g.seeds == (0, 1, 2) and not g.refused and len(g.cells) == 6
    assert g.effects["difference_vs_exact/filter"] == {"difference/filter": 1, "oracle/filter": -1}
    # a version without the single-image labeler refuses its cells, and only those
    monkeypatch.setattr(A.grids, "known_backends",
                        lambda: {"label.backend": ("difference", "oracle")})  # fmt: skip
    g = A.grid("masks", 48, 40)
    assert set(g.cells) == {f"{lab}/{f}" for lab in ("oracle", "difference")
                            for f in ("filter", "no-filter")}  # fmt: skip
    assert set(g.refused) == {"grounded_proxy/filter", "grounded_proxy/no-filter"}
    assert (
        "label.backend: 'grounded_proxy' is not a backend of this version"
        in (g.refused["grounded_proxy/filter"])
    )
    assert all(not set(t) & set(g.refused) for t in g.effects.values())
    assert "filter_effect/oracle" in g.effects and "interaction/filter_x_difference" in g.effects


def test_the_spread_grid_fixes_the_held_out_draw_and_the_test_set_and_varies_threads_and_precision():
    g = A.grid("spread", 48, 40)
    fixed = {"vocabulary.holdout_seed": 0, "evaluate.test_seed": 0}
    assert g.cells == {
        "fixed": fixed,
        "fixed/threads=2": {**fixed, "train.num_threads": 2},
        "fixed/bf16": {**fixed, "train.precision": "bf16"},
    }
    assert g.effects == {
        "threads_2_vs_1": {"fixed/threads=2": 1, "fixed": -1},
        "bf16_vs_fp32": {"fixed/bf16": 1, "fixed": -1},
    }
    assert g.seeds == (0, 1, 2, 3, 4)


def test_a_grid_without_effects_reports_its_cells_only():
    cells = {"fixed": {"vocabulary.holdout_seed": 0, "evaluate.test_seed": 0}}
    r = A.rereport(
        {
            "command": "magicseg ablate --grid still --seeds 0,1",
            "description": "d",
            "seeds": [0, 1],
            "cells": {
                c: {
                    "overrides": o,
                    "experiments": [],
                    "metrics": A.report.cell_metrics(
                        {"seen": {"0": 0.25, "1": 0.27 if c == "drawn" else 0.26}}
                    ),
                }
                for c, o in {"drawn": {}, **cells}.items()  # an override-free cell too
            },  # fmt: skip
            "effects": {},
        }
    )
    md = A.markdown({"grids": {"still": r}})
    tables = _tables(md)
    assert len(tables) == 1  # the cells only
    assert tables[0][2][:4] == ["drawn", "none (the default)", "0", "0.260 ± 0.014"]
    assert tables[0][3][1] == "`vocabulary.holdout_seed=0 evaluate.test_seed=0`"
    assert "No effects: this grid's answer is its cells' standard deviation over the seeds." in md
    assert "Beyond the noise" not in md and "No effects yet" not in md


def test_sampling_values_span_5_to_all_with_at_least_four():
    assert A.sampling_values(40) == [5, 10, 25]
    assert A.sampling_values(244) == [5, 25, 50, 100]
    assert A.sampling_values(8) == [5]  # what fits below 8
    g = A.grid("sampling", vocabulary_size=252, trainable=230)
    assert list(g.cells) == ["K=5", "K=25", "K=50", "K=100", "K=all"]
    assert g.cells["K=all"] == {"train.num_sampled": 252}
    assert g.effects["K=5_vs_all"] == {"K=5": 1, "K=all": -1}
    steps = [e for e in g.effects if not e.endswith("_vs_all")]
    assert steps == ["K=25_vs_K=5", "K=50_vs_K=25", "K=100_vs_K=50", "K=all_vs_K=100"]
    assert g.effects["K=50_vs_K=25"] == {"K=50": 1, "K=25": -1}
    assert g.seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match="unknown grid 'papr'"):
        A.grid("papr", 48, 40)


def test_hydra_values():
    assert [A.hydra_value(v) for v in (True, False, None, 0.5, 0.0, 40, "rich")] == [
        "true",
        "false",
        "null",
        "0.5",
        "0.0",
        "40",
        "rich",
    ]
    assert A.hydra_value("a photo of a {}") == '"a photo of a {}"'


# --------------------------------------------------------------------------------------------
# dvc exp show, the tables
# --------------------------------------------------------------------------------------------
def _show_row(name, rev, state, seen, error=None, log=None):
    return {
        "executor": {"state": state, "local": {"log": log}} if state else None,
        "name": name,
        "revs": [
            {
                "rev": rev,
                "name": name,
                "error": error,
                "data": {
                    "rev": rev,
                    "timestamp": "2026-11-26T02:28:23",
                    "params": {"params.yaml": {"data": {"seed": 0}}},
                    "metrics": {
                        "metrics/eval.json": {"data": {"procedural": {"miou_seen": seen}}},
                        "metrics/train.json": {"data": {"steps": 4, "num_sampled_effective": 6}},
                        "metrics/label.json": {"error": {"type": "FileNotFoundError"}},
                    },
                },
            }
        ],
    }


def test_parse_exp_show_states_and_values(tmp_path):
    log = tmp_path / "abl-x-a-s0.out"
    log.write_text("Running stage 'train':\ntrain: 10.1 s (4 steps at 2.5 s, validation 0.1 s)\n")
    rows = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {
            "rev": "b" * 40,
            "name": "main",
            "experiments": [
                _show_row("abl-x-a-s0", "1" * 40, "success", 0.5, log=str(log)),
                _show_row("abl-x-a-s1", "2" * 40, None, 0.7),  # run outside the queue
                _show_row("abl-x-b-s0", "3" * 7, "queued", None),
                _show_row("abl-x-b-s1", "4" * 7, "failed", None, {"msg": "failed"}),
            ],
        },
    ]
    exps = A.parse_exp_show(rows)
    assert [(e.name, e.state, e.baseline[:1]) for e in exps] == [
        ("abl-x-a-s0", "done", "b"),
        ("abl-x-a-s1", "done", "b"),
        ("abl-x-b-s0", "queued", "b"),
        ("abl-x-b-s1", "failed", "b"),
    ]
    assert exps[0].values() == {"seen": 0.5, "k": 6.0, "step_s": 2.5}
    assert exps[1].values() == {"seen": 0.7, "k": 6.0}  # no log: no step time
    assert exps[0].params == {"seed": 0} and "metrics/label.json" not in exps[0].metrics


def _planned(name, cell, seed, params, found=None):
    p = A.Planned("g", cell, seed, name, {}, params)
    p.found = found
    return p


def test_match_reuses_by_name_and_params_and_refuses_a_stale_name():
    head, old = "h" * 40, "o" * 40
    done = A.Experiment("abl-g-a-s0", "r1", old, "done", {"seed": 0, "x": 1})
    running = A.Experiment("abl-g-a-s1", "r2", head, "running", {"seed": 1, "x": 1})
    todo = [
        _planned("abl-g-a-s0", "a", 0, {"seed": 0, "x": 1}),
        _planned("abl-g-a-s1", "a", 1, {"seed": 1, "x": 1}),
        _planned("abl-g-b-s0", "b", 0, {"seed": 0, "x": 2}),
    ]
    A.match(todo, [done, running], head)
    assert [(p.state, p.found and p.found.rev) for p in todo] == [
        ("done", "r1"),
        ("running", "r2"),
        ("to queue", None),
    ]
    other = A.Experiment("abl-g-a-s0", "r1", old, "done", {"seed": 0, "x": 5})  # older commit
    A.match(todo[:1], [other], head)
    assert todo[0].state == "to queue"
    # queued on an earlier commit (a commit made beside a running queue): pending, not to queue
    # again, where its params are the grid's
    queued = A.Experiment("abl-g-b-s0", "r4", old, "queued", {"seed": 0, "x": 2})
    A.match(todo[2:], [queued], head)
    assert (todo[2].state, todo[2].found.rev) == ("queued", "r4")
    A.match(todo[2:], [A.Experiment("abl-g-b-s0", "r4", old, "queued", {"seed": 0, "x": 3})], head)
    assert todo[2].state == "to queue"
    stale = A.Experiment("abl-g-a-s0", "r3", head, "done", {"seed": 0, "x": 5})
    with pytest.raises(ConfigError, match=r"abl-g-a-s0: .*other params \(x: 5, the grid says 1\)"):
        A.match(todo[:1], [stale], head)


def _results():
    g = A.Grid(
        "tiny",
        {"a": {"train.cf_weight": 0.0}, "b": {"train.cf_weight": 0.5}},
        {"b_vs_a": {"b": 1, "a": -1}},
        "a test grid",
    )
    planned = []
    for cell, seen in (("a", (0.50, 0.52)), ("b", (0.60, 0.61))):
        for seed, v in enumerate(seen):
            e = A.Experiment(
                A.exp_name("tiny", cell, seed),
                f"{cell}{seed}",
                "h",
                "done",
                metrics={"metrics/eval.json": {"procedural": {"miou_seen": v}}},
            )
            p = _planned(e.name, cell, seed, {}, e)
            p.grid, p.state = "tiny", "done"
            planned.append(p)
    return A.grid_results(dataclasses.replace(g, seeds=(0, 1)), planned, previous={"a0": 0.2})


def test_recorded_results_are_reused_where_the_experiments_are_gone(tmp_path):
    """A fresh clone has no ``refs/exps``: results that ``metrics/ablations.json`` records on a
    commit with the same pipeline inputs and params count as done; after a change to params or
    to a stage's code they run again."""
    from magicseg.ablate.queue import reuse_recorded

    root = tmp_path
    _run(["git", "init", "-q"], root)
    stage = {"stages": {"s": {"cmd": "true", "deps": ["code.py"]}}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(stage))
    (root / "code.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("seed: 0\n")
    (root / "README.md").write_text("a\n")

    def commit(message: str) -> str:
        _run(["git", *GIT_ID, "add", "-A"], root)
        _run(["git", *GIT_ID, "commit", "-qm", message], root)
        return _run(["git", "rev-parse", "HEAD"], root, stdout_only=True).strip()

    base = commit("base")
    cell = {
        "overrides": {"x": 1},
        "experiments": {"0": {"name": "abl-g-a-s0", "rev": "r0", "baseline": base},
                        "1": {"name": "abl-g-a-s1", "rev": "r1"}},  # an older file: no baseline
        "metrics": {"seen": {"n": 2, "values": {"0": 0.25, "1": 0.26}},
                    "step_s": {"n": 1, "values": {"0": 0.5}}},
    }  # fmt: skip
    data = {"grids": {"g": {"cells": {"a": cell}}}}

    def fresh():
        todo = [_planned(f"abl-g-a-s{s}", "a", s, {}) for s in (0, 1)]
        todo.append(_planned("abl-g-b-s0", "b", 0, {}))
        for p in todo:
            p.overrides = {"x": 1}
        return todo

    (root / "README.md").write_text("b\n")  # not a pipeline input
    head = commit("docs")
    todo = fresh()
    assert reuse_recorded(todo, data, root, head) == [todo[0]]
    assert [p.state for p in todo] == ["done", "to queue", "to queue"]
    assert todo[0].found.values() == {"seen": 0.25, "step_s": 0.5}
    assert todo[0].found.baseline == base and todo[0].found.rev == "r0"
    other = fresh()  # the grid's overrides changed: not the recorded cell
    other[0].overrides = {"x": 2}
    assert reuse_recorded(other, data, root, head) == []
    for path, text in (("params.yaml", "seed: 1\n"), ("code.py", "x = 2\n")):
        (root / path).write_text(text)
        head = commit(f"edit {path}")
        assert reuse_recorded(fresh(), data, root, head) == [], path
        _run(["git", *GIT_ID, "revert", "--no-edit", "HEAD"], root)
        head = _run(["git", "rev-parse", "HEAD"], root, stdout_only=True).strip()
    assert len(reuse_recorded(fresh(), data, root, head)) == 1  # reverted: the same inputs


def test_grid_results_markdown_and_plot_rows():
    r = _results()
    a = r["cells"]["a"]["metrics"]
    assert a["seen"] == {"n": 2, "mean": 0.51, "std": pytest.approx(0.014142), "values": {
        "0": 0.5, "1": 0.52}}  # fmt: skip
    assert a["step_s"] == {"n": 1, "mean": 0.2, "std": None, "values": {"0": 0.2}}  # earlier file
    e = r["effects"]["b_vs_a"]["metrics"]["seen"]
    # per seed 0.10 and 0.09: mean 0.095, se 0.005, t(1) 12.706 -> [0.0315, 0.1585]
    assert e["diff"] == pytest.approx(0.095) and e["n"] == 2 and e["paired"] is True
    assert e["se"] == pytest.approx(0.005) and e["df"] == 1
    assert e["ci95"] == pytest.approx([0.095 - 12.7062 * 0.005, 0.095 + 12.7062 * 0.005], abs=1e-5)
    assert e["exceeds_noise"] is True
    assert r["command"] == "magicseg ablate --grid tiny --seeds 0,1" and r["seeds"] == [0, 1]
    md = A.markdown({"grids": {"tiny": r}})
    assert "| a | `train.cf_weight=0.0` | 2 | 0.510 ± 0.014 |" in md
    assert "| b_vs_a | b − a | 2 | **+0.095 [+0.031, +0.159]** |" in md
    assert "Beyond the noise (95% interval excludes 0): b_vs_a on seen mIoU (+0.095 [+0.031, " in md
    rows = A.plot_rows(r, "tiny").splitlines()
    assert rows[0] == "cell,metric,mean,lo,hi,n"
    assert "a,seen mIoU,0.51,0.49586,0.52414,2" in rows


def _tables(md: str) -> list[list[list[str]]]:
    """The Markdown tables in ``md``: rows of cells (a row: a line that starts with ``|``)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            assert line.endswith("|"), line
            current.append([c.strip() for c in line[1:-1].split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_tables_are_well_formed_and_say_when_nothing_is_an_effect():
    r = _results()
    # the noisy case: b's seeds flip the sign of the difference, and a cell with one seed has
    # no std
    r["cells"]["b"]["metrics"]["seen"]["values"] = {"0": 0.7, "1": 0.4}
    r = A.rereport(r)
    md = A.markdown({"grids": {"tiny": r}})
    tables = _tables(md)
    assert len(tables) == 2  # the cells, the effects
    for rows in tables:
        assert len({len(row) for row in rows}) == 1, rows  # every row as wide as the header
        assert set(rows[1]) <= {"---"}  # the separator
        assert all("|" not in c and "\n" not in c for row in rows for c in row)
    assert [row[0] for row in tables[0][2:]] == ["a", "b"]
    assert tables[0][0][:3] == ["cell", "overrides", "n"] and "s/step" in tables[0][0]
    assert tables[0][2][tables[0][0].index("s/step")] == "0.200"  # n = 1: no ± std
    assert tables[1][2][:3] == ["b_vs_a", "b − a", "2"]
    # per seed +0.20 and -0.12: mean 0.04, se 0.16, t(1) -> [-1.993, +2.073]; not bold
    # no step time in b, so no effect has one: no s/step column
    assert tables[1][0][3:] == ["seen mIoU"] and tables[1][2][3:] == ["+0.040 [-1.993, +2.073]"]
    assert "No effect's 95% interval excludes 0: every difference here is within the noise." in md
    r["cells"]["b"]["metrics"]["step_s"] = A.summarize([0.3]) | {"values": {"0": 0.3}}
    r = A.rereport(r)
    md = A.markdown({"grids": {"tiny": r}})
    assert "| b_vs_a | b − a | 1/2 | +0.040 [-1.993, +2.073] | +0.100 |" in md
    assert "1 difference(s) without an interval (fewer than 2 seeds)" in md


def test_an_effect_column_no_effect_has_a_value_of_is_left_out():
    """A metric only one cell has (a new metric the cells recorded earlier lack) gives no
    effect a value: its column would be all dashes."""
    r = _results()
    r["cells"]["b"]["metrics"]["cf_fg"] = A.report.cell_metrics({"cf_fg": {"0": 0.3, "1": 0.2}})[
        "cf_fg"
    ]
    md = A.markdown({"grids": {"tiny": A.rereport(r)}})
    effects = _tables(md)[1]
    # and s/step: only a has a step time
    assert effects[0][3:] == ["seen mIoU"]
    r["cells"]["a"]["metrics"]["cf_fg"] = A.report.cell_metrics({"cf_fg": {"0": 0.4, "1": 0.4}})[
        "cf_fg"
    ]
    effects = _tables(A.markdown({"grids": {"tiny": A.rereport(r)}}))[1]
    assert effects[0][3:] == ["seen mIoU", "cf pixels called a class"]
    assert effects[2][-1] == "-0.150 [-0.785, +0.485]"


def test_readme_ablation_tables_are_the_committed_ones():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- ablations:start -->")[1].split("<!-- ablations:end -->")[0]
    committed = ROOT / "metrics/ablations.md"
    if not committed.is_file():
        assert "Not run yet" in block  # the placeholder says so until there is a run
        return
    assert block.strip() == committed.read_text().strip(), (
        "copy them with: python scripts/readme_ablations.py"
    )
    data = json.loads((ROOT / "metrics/ablations.json").read_text())
    assert A.markdown(data) == committed.read_text()  # the table is the JSON's


def test_the_committed_figures_are_those_of_their_per_seed_values():
    """Every mean, std and effect of metrics/ablations.json is what its per-seed values give
    (re-report it with: magicseg ablate --grid all --report-only)."""
    data = json.loads((ROOT / "metrics/ablations.json").read_text())
    for name, g in data["grids"].items():
        assert A.rereport(g) == g, name
        for e in g["effects"].values():
            for r in e["metrics"].values():
                assert set(r) == {"diff", "ci95", "n", "se", "df", "paired", "exceeds_noise"}
                if r["ci95"] is not None:
                    assert r["exceeds_noise"] == (r["ci95"][0] > 0 or r["ci95"][1] < 0)


def test_report_only_rewrites_the_table_from_the_json(tmp_path):
    r = _results()
    out = tmp_path / "ablations.json"
    out.write_text(json.dumps({"grids": {"tiny": r}}))
    # an edited per-seed value: the re-report follows it everywhere
    data = json.loads(out.read_text())
    data["grids"]["tiny"]["cells"]["b"]["metrics"]["seen"]["values"]["1"] = 0.71
    out.write_text(json.dumps(data))
    code, text = _ablate("--grid", "tiny", "--report-only", "--out", str(out),
                         "--plots", str(tmp_path / "plots"))  # fmt: skip
    assert code == 0, text
    new = json.loads(out.read_text())["grids"]["tiny"]
    assert new["cells"]["b"]["metrics"]["seen"]["mean"] == pytest.approx(0.655)
    assert new["effects"]["b_vs_a"]["metrics"]["seen"]["diff"] == pytest.approx(0.145)
    md = (tmp_path / "ablations.md").read_text()
    assert md == A.markdown(json.loads(out.read_text()))
    assert "| b | `train.cf_weight=0.5` | 2 | 0.655 ± 0.078 |" in md
    assert (tmp_path / "plots/tiny.csv").read_text() == A.plot_rows(new, "tiny")
    code, text = _ablate("--grid", "paper", "--report-only", "--out", str(out))
    assert code == 2 and "--grid: paper not in" in text
    code, text = _ablate("--grid", "tiny", "--report-only", "--seeds", "0", "--out", str(out))
    assert code == 2 and "--report-only: runs nothing" in text


# --------------------------------------------------------------------------------------------
# through DVC
# --------------------------------------------------------------------------------------------
def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(root / "src")
    return env


def _run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def _json(args: list[str], cwd: Path):
    return json.loads(_run(args, cwd, stdout_only=True))


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A miniature copy of the project (git + DVC, Hydra composition on, the miniature params
    in conf/ so that every experiment composes them), committed, nothing run."""
    root = tmp_path_factory.mktemp("ablate") / "project"
    root.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "stages", "src", "conf", ".gitignore"):
        src = ROOT / name
        (shutil.copytree(src, root / name, ignore=skip) if src.is_dir() else shutil.copy(src, root / name))  # fmt: skip
    conf = root / "conf/config.yaml"
    header = conf.read_text().split("\nseed:", 1)[0] + "\n"
    composed = _merge(yaml.safe_load(conf.read_text()), MINI)
    composed.pop("defaults")
    conf.write_text(header + yaml.safe_dump(composed, sort_keys=False))
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), MINI)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git_repo(root)
    _run(DVC + ["init", "-q"], root)
    for key, value in (("core.analytics", "false"), ("core.check_update", "false"),
                       ("hydra.enabled", "true")):  # fmt: skip
        _run(DVC + ["config", key, value], root)
    shutil.copytree(ROOT / ".dvc/plots", root / ".dvc/plots")
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "miniature project"], root)
    return root


def _git_repo(root: Path, clone_of: Path | None = None) -> None:
    """A git repository (a clone of ``clone_of``) with the identity experiments commit with."""
    if clone_of is None:
        _run(["git", "init", "-q"], root)
    else:
        _run(["git", "clone", "-q", str(clone_of), str(root)], root.parent)
    for key, value in zip(("user.name", "user.email"), GIT_ID[1::2], strict=True):
        _run(["git", "config", key, value.split("=", 1)[1]], root)


TINY = {"a": {"train.cf_weight": 0.0}, "b": {"train.cf_weight": 0.5}}


@pytest.fixture
def project(monkeypatch, mini):
    """The miniature project as the working directory (its own code on the path)."""
    monkeypatch.chdir(mini)
    for k, v in _env(mini).items():
        monkeypatch.setenv(k, v)
    return mini


@pytest.fixture
def tiny_grid(monkeypatch, project):
    """... with a 2-cell grid ``tiny``: the counterfactual loss off and on."""
    monkeypatch.setitem(A.GRIDS, "tiny", TINY)
    monkeypatch.setitem(A.EFFECTS, "tiny", {"b_vs_a": {"b": 1, "a": -1}})
    return project


def _ablate(*args: str):
    result = runner.invoke(app, ["ablate", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _by_hand(root: Path) -> dict[str, dict[str, float]]:
    """Experiment name -> metric -> value, walking the nested ``dvc exp show --json``."""
    out = {}
    for row in _json(DVC + ["exp", "show", "--json"], root):
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                metrics = rev["data"]["metrics"]
                ev = metrics["metrics/eval.json"]["data"]["procedural"]
                values = {
                    "seen": ev.get("miou_seen"),
                    # None or absent where the few test images hold no held-out class
                    "heldout": ev.get("miou_heldout"),
                    "label_miou": metrics["metrics/label.json"]["data"]["oracle_miou"],
                    "kept_ratio": metrics["metrics/filter.json"]["data"]["kept_ratio"],
                }
                out[rev["name"]] = {k: v for k, v in values.items() if v is not None}
                out[rev["name"]]["log"] = exp["executor"]["local"]["log"]
    return out


@pytest.mark.slow
def test_a_tiny_grid_through_the_dvc_queue(tiny_grid):
    root = tiny_grid
    params_before = (root / "params.yaml").read_text()

    # 1. The dry run: four experiments to queue, the commands a user could type.
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1", "--dry-run")
    assert code == 0, out
    assert "4 experiments (tiny x seeds 0,1): 4 to queue" in out
    assert "dvc exp run --queue -n abl-tiny-b-s1 -S seed=1 -S train.cf_weight=0.5" in out
    assert not (root / "metrics/ablations.json").exists()

    # 2. The run.
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1")
    assert code == 0, out
    data = json.loads((root / "metrics/ablations.json").read_text())
    tiny = data["grids"]["tiny"]
    assert tiny["command"] == "magicseg ablate --grid tiny --seeds 0,1"
    hand = _by_hand(root)
    assert set(hand) == {f"abl-tiny-{c}-s{s}" for c in "ab" for s in (0, 1)}
    for cell in ("a", "b"):
        c = tiny["cells"][cell]
        assert c["overrides"] == TINY[cell]
        assert {s: e["name"] for s, e in c["experiments"].items()} == {
            "0": f"abl-tiny-{cell}-s0",
            "1": f"abl-tiny-{cell}-s1",
        }
        for metric in ("seen", "heldout", "label_miou", "kept_ratio"):
            by_seed = {
                str(s): hand[f"abl-tiny-{cell}-s{s}"][metric]
                for s in (0, 1)
                if metric in hand[f"abl-tiny-{cell}-s{s}"]
            }
            if metric != "heldout":
                assert len(by_seed) == 2, (cell, metric)
            if not by_seed:  # a metric no experiment has is left out
                assert metric not in c["metrics"]
                continue
            values = list(by_seed.values())
            m = c["metrics"][metric]
            assert m["n"] == len(values) and m["values"] == by_seed
            assert m["mean"] == pytest.approx(statistics.mean(values), abs=1e-6)
            if len(values) == 2:
                assert m["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert c["metrics"]["step_s"]["n"] == 2 and c["metrics"]["step_s"]["mean"] > 0
    # the seeds re-draw the data: the labels' agreement differs between seeds
    assert tiny["cells"]["a"]["metrics"]["label_miou"]["std"] > 0
    for metric in ("seen", "step_s"):  # (a few training steps: mIoU may be 0 everywhere)
        effect = tiny["effects"]["b_vs_a"]["metrics"][metric]
        a, b = (tiny["cells"][c]["metrics"][metric] for c in "ab")
        assert effect["diff"] == pytest.approx(b["mean"] - a["mean"], abs=1e-6)
        d = [b["values"][s] - a["values"][s] for s in ("0", "1")]  # paired by seed
        se = statistics.stdev(d) / math.sqrt(2)
        assert effect["se"] == pytest.approx(se, abs=1e-6) and effect["paired"] is True
        lo, hi = effect["ci95"]
        assert lo == pytest.approx(effect["diff"] - 12.7062 * se, abs=1e-5)
        assert effect["exceeds_noise"] == (lo > 0 or hi < 0)
    assert tiny["effects"]["b_vs_a"]["metrics"]["step_s"]["se"] > 0
    a = tiny["cells"]["a"]["metrics"]["seen"]

    # 3. The data stages ran once per seed; the second cell of a seed restored them.
    for seed in (0, 1):
        logs = [Path(hand[f"abl-tiny-{c}-s{seed}"]["log"]).read_text() for c in "ab"]
        for stage in ("vocabulary", "prompts", "generate", "label", "filter"):
            ran = [f"Running stage '{stage}'" in log for log in logs]
            cached = [f"Stage '{stage}' is cached" in log for log in logs]
            assert ran == [True, False] and cached == [False, True], (seed, stage)
        assert all("Running stage 'train'" in log for log in logs)
    restored = out.split("restored from the run cache: ", 1)[1].splitlines()[0]
    for stage in ("vocabulary", "prompts", "generate", "label", "filter"):
        assert f"{stage} 2" in restored.split(", "), restored

    # 4. The table and the plot; DVC renders the plot with the custom template.
    table = (root / "metrics/ablations.md").read_text()
    assert "### Grid `tiny`" in table and "| b_vs_a | b − a |" in table
    assert f"| a | `train.cf_weight=0.0` | 2 | {a['mean']:.3f} ± {a['std']:.3f} |" in table
    csv_rows = (root / "plots/ablations/tiny.csv").read_text().splitlines()
    assert csv_rows[0] == "cell,metric,mean,lo,hi,n" and len(csv_rows) > 4
    shown = _json(DVC + ["plots", "show", "--json"], root)["data"]
    (plot,) = shown["plots/ablations/tiny.csv"]  # the plots/ablations entry of dvc.yaml
    spec = plot["content"]
    assert spec["facet"]["row"]["field"] == "metric"
    assert {r["cell"] for r in spec["data"]["values"]} == {"a", "b"}

    # 5. The workspace is untouched (experiments ran in temporary copies).
    assert (root / "params.yaml").read_text() == params_before
    assert not (root / "data").exists() and not (root / "models").exists()

    # 6. A re-run queues nothing and writes the same file.
    before = (root / "metrics/ablations.json").read_bytes()
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1")
    assert code == 0, out
    assert "4 experiments (tiny x seeds 0,1): 4 done" in out and "stages run" not in out
    assert (root / "metrics/ablations.json").read_bytes() == before
    assert len(_by_hand(root)) == 4

    # 7. --collect with a seed not run: nothing queued, the finished seeds written, the rest
    #    listed; then the file is restored by a plain re-run.
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1,2", "--collect")
    assert code == 0, out
    assert "2 to queue" in out and "--collect: 2 experiment(s) not run; none queued" in out
    assert "abl-tiny-b-s2: not run" in out and "stages run" not in out
    collected = json.loads((root / "metrics/ablations.json").read_text())["grids"]["tiny"]
    assert collected["cells"]["a"]["metrics"]["seen"]["n"] == 2
    assert collected["effects"]["b_vs_a"]["metrics"]["seen"]["n"] == 2
    assert len(_by_hand(root)) == 4  # nothing queued
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1", "--collect", "--dry-run")
    assert code == 2 and "--collect" in out

    # 8. --collect beside a queue that still holds an experiment of the grid: not a failure.
    _run(DVC + ["exp", "run", "--queue", "-n", "abl-tiny-a-s2", "-S", "seed=2",
                "-S", "train.cf_weight=0.0"], root)  # fmt: skip
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1,2", "--collect")
    assert code == 0, out
    assert "abl-tiny-a-s2: still queued in DVC's queue" in out and "did not finish" not in out
    assert "abl-tiny-b-s2: not run" in out and "--collect: 1 experiment(s) not run" in out
    _run(DVC + ["queue", "remove", "abl-tiny-a-s2"], root)
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1")
    assert code == 0 and (root / "metrics/ablations.json").read_bytes() == before


@pytest.mark.slow
def test_refusals_before_any_work(tiny_grid, monkeypatch):
    root = tiny_grid
    code, out = _ablate("--grid", "papr")
    assert code == 2 and "error: --grid: unknown grid 'papr'" in out
    code, out = _ablate("--grid", "tiny", "--seeds", "0,x")
    assert code == 2 and "error: --seeds" in out
    path = root / "src/magicseg/filter.py"
    original = path.read_text()
    path.write_text(original + "# an edit\n")
    try:
        code, out = _ablate("--grid", "tiny", "--seeds", "0")
    finally:
        path.write_text(original)
    assert code == 2 and "uncommitted changes to src/magicseg/filter.py" in out
    if (root / "metrics/ablations.json").exists():  # a cell whose overrides changed
        monkeypatch.setitem(A.GRIDS, "tiny", {**TINY, "b": {"train.cf_weight": 0.25}})
        code, out = _ablate("--grid", "tiny", "--seeds", "0,1", "--dry-run")
        assert code == 2 and "other params (train.cf_weight: 0.5, the grid says 0.25)" in out


@pytest.mark.slow
def test_finished_experiments_of_an_earlier_commit_are_reused_while_the_code_is_the_same(
    tiny_grid, monkeypatch
):
    root = tiny_grid
    if not (root / "metrics/ablations.json").exists():
        pytest.skip("needs the tiny grid's experiments (test_a_tiny_grid_through_the_dvc_queue)")
    _run(["git", "add", "metrics", "plots"], root)
    _run(["git", *GIT_ID, "commit", "-qm", "ablation results"], root)
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1", "--dry-run")
    assert code == 0 and "4 done" in out and "(commit " in out, out
    # a fresh clone has no refs/exps: the results the committed ablations.json records count
    clone = root.parent / "clone-of-the-tiny-grid"
    shutil.rmtree(clone, ignore_errors=True)
    _git_repo(clone, clone_of=root)
    monkeypatch.chdir(clone)
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1,2", "--dry-run")
    assert code == 0 and "4 done, 2 to queue" in out and "(recorded, commit " in out, out
    monkeypatch.chdir(root)
    # a change to a file a stage depends on: the earlier experiments no longer count
    seeding = root / "src/magicseg/core/seeding.py"
    seeding.write_text(seeding.read_text() + "# an edit\n")
    _run(["git", *GIT_ID, "commit", "-qam", "edit the core"], root)
    code, out = _ablate("--grid", "tiny", "--seeds", "0,1", "--dry-run")
    assert code == 0 and "4 to queue" in out, out
    _run(["git", "revert", "--no-edit", "HEAD"], root)


@pytest.mark.slow
def test_a_failed_experiment_is_reported_with_its_log(tiny_grid, monkeypatch):
    root = tiny_grid
    bad = {"vocabulary.source": "file", "vocabulary.file": "/nonexistent/classes.txt"}
    monkeypatch.setitem(A.GRIDS, "broken", {"bad": bad, "good": TINY["a"]})
    out_file = root / "broken/ablations.json"
    code, out = _ablate("--grid", "broken", "--seeds", "0", "--out", str(out_file),
                        "--plots", str(root / "broken/plots"))  # fmt: skip
    assert code == 2, out
    assert "abl-broken-bad-s0: failed (dvc queue logs abl-broken-bad-s0)" in out
    assert "error: vocabulary.file: /nonexistent/classes.txt does not exist" in out
    assert "error: ablate: 1 experiment(s) did not finish (abl-broken-bad-s0)" in out
    cells = json.loads(out_file.read_text())["grids"]["broken"]["cells"]
    assert cells["bad"]["experiments"] == {} and cells["good"]["metrics"]["seen"]["n"] == 1


@pytest.mark.slow
def test_the_real_grids_plan_on_the_miniature_project(project):
    code, out = _ablate("--grid", "all", "--seeds", "0,1,2", "--dry-run")
    assert code == 0, out
    # paper 8 cells, masks 6 (exact, grounded_proxy, difference x filter on/off), sampling:
    # K = 5, 25, 50, 100 below the trainable classes and all (the 252 classes of the vocabulary,
    # which the trainer clamps), spread: the held-out draw fixed, at 1 and 2 threads and in bf16:
    # 22 cells x 3 seeds
    assert "66 experiments (paper, masks, sampling, spread x seeds 0,1,2)" in out
    assert "refused" not in out
    for line in (
        "-n abl-paper-rich-hinge-head-s0 -S seed=0 -S prompts.style=rich "
        "-S train.cf_loss=hinge_head -S train.cf_weight=0.5",
        "-n abl-paper-plain-off-s2 -S seed=2 -S prompts.style=plain -S train.cf_weight=0.0",
        "-n abl-masks-oracle-no-filter-s1 -S seed=1 -S label.backend=oracle "
        "-S filter.enabled=false",
        "-n abl-masks-grounded-proxy-no-filter-s0 -S seed=0 -S label.backend=grounded_proxy "
        "-S filter.enabled=false",
        "-n abl-sampling-k-100-s0 -S seed=0 -S train.num_sampled=100",
        "-n abl-sampling-k-all-s0 -S seed=0 -S train.num_sampled=252",
        "-n abl-spread-fixed-s2 -S seed=2 -S vocabulary.holdout_seed=0 -S evaluate.test_seed=0",
        "-n abl-spread-fixed-threads-2-s1 -S seed=1 -S vocabulary.holdout_seed=0 "
        "-S evaluate.test_seed=0 -S train.num_threads=2",
        "-n abl-spread-fixed-bf16-s0 -S seed=0 -S vocabulary.holdout_seed=0 "
        "-S evaluate.test_seed=0 -S train.precision=bf16",
    ):
        assert f"dvc exp run --queue {line}\n" in out, line
    # without --seeds each grid runs on its own: paper 5 seeds, the others 3
    code, out = _ablate("--grid", "paper,masks", "--dry-run")
    assert code == 0, out
    assert "58 experiments (paper x seeds 0,1,2,3,4, masks x seeds 0,1,2)" in out
    assert "-n abl-masks-grounded-proxy-filter-s2 -S seed=2 -S label.backend=grounded_proxy" in out
    assert "-n abl-paper-plain-text-margin-s4 -S seed=4 -S prompts.style=plain " in out


@pytest.mark.slow
def test_num_sampled_50_as_written_and_above_the_trainable_classes(mini, tmp_path):
    """The design card's `dvc exp run -S train.num_sampled=50`, as written, on the miniature
    offline project (236 trainable classes: 50 scored per image); in a 40-class world (33
    trainable) the trainer uses them all and says so in one warning line."""
    from magicseg.core.vocabulary import build_vocabulary

    clone = tmp_path / "clone"
    _git_repo(clone, clone_of=mini)
    out = _run(DVC + ["exp", "run", "-S", "train.num_sampled=50"], clone)
    assert "Running stage 'train'" in out and "warning: train.num_sampled" not in out
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["num_sampled"] == 50
    train = json.loads((clone / "metrics/train.json").read_text())
    assert train["num_sampled_effective"] == 50 and train["steps"] == MINI["train"]["steps"]

    out = _run(DVC + ["exp", "run", "-S", "train.num_sampled=50", "-S", "vocabulary.limit=40"],
               clone)  # fmt: skip
    params = yaml.safe_load((clone / "params.yaml").read_text())
    args = A.queue.vocabulary_args(parse_params(params, "clone"), params["seed"])
    n = len(build_vocabulary(**args).trainable)
    assert n == 33
    warnings = [line for line in out.splitlines() if "train.num_sampled" in line]
    assert warnings == [
        f"warning: train.num_sampled: 50 exceeds the {n} trainable classes; using {n}"
    ]
    assert json.loads((clone / "metrics/train.json").read_text())["num_sampled_effective"] == n
    assert (clone / "models/model.pt").is_file()
