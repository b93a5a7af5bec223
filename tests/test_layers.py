"""The package's layers, checked from the source: each stage's DVC deps cover what its script
can import, closures stay small, the package root is light, no import circles, named random
streams, and one copy of the device resolution and of the report writers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scripts.stage_deps import (
    ROOT,
    closure,
    edges,
    module_file,
    stage_closure,
    stage_deps,
    uncovered,
)
from tests.helpers import STAGES

SRC = ROOT / "src" / "magicseg"


def _modules() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


# --------------------------------------------------------------------------------------------
# dvc.yaml deps and closures
# --------------------------------------------------------------------------------------------
def test_the_closure_tool_sees_function_local_relative_and_parent_imports(tmp_path):
    """On the real package: a function-local import (model -> model.clip), a parent package
    (core.config -> core/__init__) and a submodule named in ``from pkg import name``."""
    deps = closure(ROOT / "stages" / "train.py")
    assert "magicseg.model.clip" in deps  # imported inside a registry builder only
    assert {"magicseg", "magicseg.core", "magicseg.model"} <= deps  # parents
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from magicseg.core import seeding\n")
    # magicseg/__init__.py runs first and imports the error classes
    assert closure(script) == {
        "magicseg",
        "magicseg.core",
        "magicseg.core.errors",
        "magicseg.core.seeding",
    }


def test_every_stage_is_in_dvc_yaml_and_each_has_a_script():
    assert tuple(stage_deps()) == STAGES
    for stage in STAGES:
        assert (ROOT / "stages" / f"{stage}.py").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_the_scripts_import_closure(stage):
    deps = stage_deps()[stage]
    assert "src/magicseg/core" in deps, "every stage lists the shared core"
    missing = uncovered(stage, deps)
    assert not missing, f"dvc.yaml: stage {stage} lacks deps covering {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_name_only_what_the_stage_runs(stage):
    """No library dep covers nothing of the closure (a stale dep re-runs the stage for
    nothing)."""
    files = {str(module_file(m).relative_to(ROOT)) for m in stage_closure(stage)}
    for dep in stage_deps()[stage]:
        if dep.startswith("src/"):
            assert any(f == dep or f.startswith(dep + "/") for f in files), dep


FORBIDDEN = {
    "data": ("magicseg.model", "magicseg.training", "magicseg.evaluation"),
    "train": ("magicseg.generate", "magicseg.label", "magicseg.prompts", "magicseg.evaluation"),
    # the pre-flight reads the backends' source checks and the datasets' layouts, no model,
    # training or scoring code
    "check": (
        "magicseg.model",
        "magicseg.training",
        "magicseg.inference",
        "magicseg.evaluation.stage",
        "magicseg.evaluation.real",
        "magicseg.evaluation.procedural",
        "magicseg.evaluation.segmenters",
        "magicseg.prompts.stage",
        "magicseg.prompts.transformers_writer",
    ),
}


@pytest.mark.parametrize("stage", STAGES[:-1])
def test_closures_stay_small(stage):
    """Data stages reach no model, training or evaluation code; train reaches no data-stage
    or evaluation code; the pre-flight no model, training or scoring code. So editing the
    trainer re-runs train (and what reads its model)."""
    kind = stage if stage in ("train", "check") else "data"
    mods = stage_closure(stage)
    bad = sorted(m for m in mods for f in FORBIDDEN[kind] if m == f or m.startswith(f + "."))
    assert not bad, f"{stage} reaches {bad}"


# --------------------------------------------------------------------------------------------
# a light root, no circles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    [
        "magicseg",
        "magicseg.core.config",
        "magicseg.core.stage",
        "magicseg.evaluation",
        "magicseg.launch",  # started by DVC before every launched stage
    ],
)
def test_import_loads_no_torch(module):
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_package_root_and_core_reach_no_model_or_training_code(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import magicseg\nimport magicseg.core.config\nimport magicseg.core.stage\n")
    reached = closure(script)
    assert all(
        m == "magicseg" or m.startswith("magicseg.core.") or m == "magicseg.core" for m in reached
    )
    assert "magicseg.core.errors" in reached
    assert edges("magicseg.core") == set()  # core/__init__ imports nothing


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = {m: edges(m) for m in _modules()}
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]  # the detector works
    assert _circles(graph) == []


def test_model_code_imports_no_training_or_evaluation_code():
    for m in _modules():
        if m.startswith("magicseg.model"):
            bad = {
                e for e in edges(m) if e.startswith(("magicseg.training", "magicseg.evaluation"))
            }
            assert not bad, (m, bad)


# --------------------------------------------------------------------------------------------
# named random streams
# --------------------------------------------------------------------------------------------
def _calls(name: str):
    for path, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def test_every_stream_name_at_a_call_site_is_in_the_table():
    from magicseg.core.seeding import STREAMS

    used = set()
    for fn in ("derive_seed", "rng"):
        for path, call in _calls(fn):
            if path.name == "seeding.py":
                continue
            assert len(call.args) >= 2, f"{path}:{call.lineno}: {fn}(seed, name, ...)"
            name = call.args[1]
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), (
                f"{path}:{call.lineno}: the stream name must be a literal"
            )
            assert name.value in STREAMS, f"{path}:{call.lineno}: {name.value!r} not in STREAMS"
            used.add(name.value)
    assert used == set(STREAMS), f"streams in the table but never used: {set(STREAMS) - used}"


def _bare(arg: ast.AST) -> bool:
    """A seed made of bare numbers: a literal, a list/tuple (``[seed, 3]``) or arithmetic
    (``seed * 1_000_003 + 17``). A call (``rng.integers(2**63)``, a child stream of a named
    one) is not."""
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, int) and not isinstance(arg.value, bool)
    return isinstance(arg, (ast.List, ast.Tuple, ast.BinOp))


def test_no_random_source_seeded_by_bare_numbers():
    """``default_rng([seed, 3])``, ``default_rng(7)``, ``manual_seed(seed * 1_000_003 + 17)``:
    none left; seeds come from derive_seed/rng or from a record's own derived seed."""
    bad = []
    for fn in ("default_rng", "manual_seed", "seed", "Random", "RandomState"):
        for path, call in _calls(fn):
            if path.name == "seeding.py":
                continue
            for arg in call.args:
                if _bare(arg):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)}")
    assert not bad, bad


def test_derive_seed_refuses_unknown_streams_and_separates_names():
    from magicseg.core.seeding import derive_seed, rng

    with pytest.raises(ValueError, match="unknown random stream 'nope'"):
        derive_seed(0, "nope")
    a, b = derive_seed(0, "train.sampler"), derive_seed(0, "train.augment")
    assert a != b and 0 <= a < 2**63 and derive_seed(0, "train.sampler") == a
    assert derive_seed(1, "train.sampler") != a
    assert derive_seed(0, "generate.sample", "x") != derive_seed(0, "generate.sample", "y")
    assert rng(0, "train.sampler").random() == rng(0, "train.sampler").random()


# --------------------------------------------------------------------------------------------
# one copy of each
# --------------------------------------------------------------------------------------------
def _defs(name: str) -> list[str]:
    return [
        str(path.relative_to(ROOT))
        for path, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]


@pytest.mark.parametrize(
    "name, home",
    [
        ("resolve_device", "src/magicseg/core/devices.py"),
        ("resolve_dtype", "src/magicseg/core/devices.py"),
        ("summarise", "src/magicseg/evaluation/report.py"),
        ("write_per_class", "src/magicseg/evaluation/report.py"),
        ("draw_gallery", "src/magicseg/viz.py"),
        ("to_tensor", "src/magicseg/model/base.py"),
        ("load_vocabulary", "src/magicseg/core/stage.py"),
        ("shape_mask", "src/magicseg/scene.py"),
        ("_smooth_noise", "src/magicseg/scene.py"),
    ],
)
def test_one_definition(name, home):
    assert _defs(name) == [home]


def test_no_inline_device_choice_and_no_second_palette():
    """``"cuda" if torch.cuda.is_available() else "cpu"`` only in core/devices.py; palettes and
    PNG galleries only through viz."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if path.name != "devices.py":
            assert '"cuda" if torch.cuda.is_available()' not in text, path
        if path.name != "viz.py":
            assert "PALETTE" not in text and "ImageDraw" not in text, path


def test_vocabulary_read_through_one_helper():
    for path in list(SRC.rglob("*.py")) + list((ROOT / "stages").glob("*.py")):
        if path.name != "stage.py":
            assert "Vocabulary.from_frame(read_manifest" not in path.read_text(), path


def test_dvc_yaml_evaluate_writes_one_plots_folder():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = stages["evaluate"]["outs"]
    assert outs == ["plots/evaluate"]
