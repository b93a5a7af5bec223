"""The whole DVC pipeline on a miniature params file: `dvc repro`, a no-op re-run, and a
params change that re-runs only the affected stages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

MINI = {
    "vocabulary": {"holdout_combination": 4, "holdout_novel_words": 1},
    "prompts": {"requests": 6, "per_request": 4},
    "generate": {"height": 32, "width": 32},
    "train": {
        "steps": 4,
        "batch_size": 4,
        "num_sampled": 6,
        "log_every": 2,
        "val_every": 2,
        "offline": {"width": 8, "depth": 2, "embed_dim": 16},
    },
    "evaluate": {"test_samples": 8, "gallery": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    # 1. A copy of the project with a miniature params file, in a fresh git + DVC repo.
    for name in ("dvc.yaml", "stages", "src", "conf"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), MINI)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], tmp_path)
    _run(dvc + ["init", "-q"], tmp_path)
    _run(dvc + ["config", "core.analytics", "false"], tmp_path)
    _run(["git", "add", "-A"], tmp_path)
    git_id = ["-c", "user.name=magicseg test", "-c", "user.email=test@magicseg.invalid"]
    _run(["git", *git_id, "commit", "-qm", "miniature project"], tmp_path)

    # 2. Every stage runs and writes its metrics.
    log = _run(dvc + ["repro"], tmp_path)
    assert _ran(log) == {
        "vocabulary",
        "prompts",
        "generate",
        "label",
        "filter",
        "train",
        "evaluate",
    }
    metrics = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "metrics").glob("*.json")}
    assert metrics["prompts"]["prompts"] == 24
    assert metrics["label"]["samples"] == 24 and metrics["label"]["oracle_miou"] > 0.3
    assert 0 < metrics["filter"]["kept"] <= 24
    assert metrics["train"]["steps"] == 4
    assert 0.0 <= metrics["eval"]["procedural"]["miou"] <= 1.0
    assert (tmp_path / "models/model.pt").is_file()
    assert (tmp_path / "plots/evaluate/gallery.png").is_file()

    # 3. Nothing changed: nothing runs.
    assert _ran(_run(dvc + ["repro"], tmp_path)) == set()

    # 4. A label param: the upstream stages stay cached.
    params["label"]["difference"]["threshold"] = 0.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran(_run(dvc + ["repro"], tmp_path))
    assert {"label", "filter"} <= ran
    assert not ran & {"vocabulary", "prompts", "generate"}
