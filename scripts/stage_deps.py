"""The library modules each pipeline stage can run, and whether dvc.yaml's deps cover them.

A stage runs ``stages/<stage>.py`` (through ``python -m magicseg.launch`` for the launched
stages); what it can execute of ``src/magicseg`` is the import closure of that script and of
the modules its ``cmd`` runs with ``python -m``: every ``import``/``from ... import`` anywhere in a module (function-
local ones included: backends load that way), relative imports resolved, ``from pkg import
name`` counted when ``name`` is a submodule, and every parent package's ``__init__.py`` (Python
runs it on import). A DVC dep covers a file equal to it or under it.

Usage: ``python scripts/stage_deps.py`` lists each stage's closure and the library files its
deps do not cover (none when dvc.yaml is right); ``tests/test_layers.py`` checks the same.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "magicseg"


def module_file(name: str) -> Path | None:
    """``src/`` file of module ``name`` (a package's ``__init__.py``), None if not a module."""
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_names(path: Path, module: str | None = None) -> set[str]:
    """Dotted names of ``magicseg`` modules (or their attributes) imported anywhere in
    ``path``; ``module`` (its dotted name) resolves relative imports."""
    tree = ast.parse(path.read_text(), str(path))
    package = ""
    if module is not None:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            out.add(source)
            out |= {f"{source}.{alias.name}" for alias in node.names}
    return {n for n in out if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def edges(module: str) -> set[str]:
    """The modules ``module`` imports (names that are modules, not attributes)."""
    path = module_file(module)
    assert path is not None, module
    return {n for n in imported_names(path, module) if module_file(n) is not None}


def closure(script: Path) -> set[str]:
    """Every ``magicseg`` module that running ``script`` can import (see the module doc)."""
    return _expand(imported_names(script))


def _expand(names: set[str]) -> set[str]:
    """``names`` (those that are modules), their parent packages and all they import."""
    todo = [n for n in names if module_file(n) is not None]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        for mod in _with_parents(name):
            if mod in seen or module_file(mod) is None:
                continue
            seen.add(mod)
            todo.extend(edges(mod))
    return seen


def stage_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """``deps`` of every stage in ``dvc_yaml``."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: list(stage.get("deps", [])) for name, stage in stages.items()}


def cmd_modules(stage: str, dvc_yaml: Path = ROOT / "dvc.yaml") -> set[str]:
    """``magicseg`` modules the stage's ``cmd`` runs with ``python -m`` (the launcher)."""
    cmd = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]["cmd"]
    words = cmd.split()
    pairs = zip(words, words[1:], strict=False)
    return {b for a, b in pairs if a == "-m" and b.startswith(PACKAGE)}


def stage_closure(stage: str) -> set[str]:
    """What running the stage can import: its script's closure and that of every module its
    ``cmd`` runs with ``python -m`` (``magicseg.launch``)."""
    return closure(ROOT / "stages" / f"{stage}.py") | _expand(cmd_modules(stage))


def covered(path: str, deps: list[str]) -> bool:
    """True when a dep is ``path`` or a directory above it."""
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


def relative(module: str) -> str:
    return str(module_file(module).relative_to(ROOT))


def uncovered(stage: str, deps: list[str]) -> list[str]:
    """Files of the stage's closure (:func:`stage_closure`) and its script no dep covers."""
    script = ROOT / "stages" / f"{stage}.py"
    files = [str(script.relative_to(ROOT))] + sorted(relative(m) for m in stage_closure(stage))
    return [f for f in files if not covered(f, deps)]


def main() -> int:
    bad = 0
    for stage, deps in stage_deps().items():
        mods = sorted(stage_closure(stage))
        missing = uncovered(stage, deps)
        bad += len(missing)
        print(f"{stage}: {len(mods)} modules: {' '.join(m[len(PACKAGE) + 1 :] for m in mods)}")
        for f in missing:
            print(f"  NOT COVERED by dvc.yaml deps: {f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
