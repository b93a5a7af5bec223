"""The whole DVC pipeline on a miniature copy of the project, built once per module: every
stage runs, a no-op re-run, the team workflow through a DVC remote (push, fresh clone, pull:
nothing to re-run, no metrics difference), which stages a change marks as changed, the same
bytes from a re-training in a clean clone, and a SIGKILLed `dvc repro train` that resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tests.helpers import STAGES as ALL_STAGES
from tests.helpers import TINY_PRETRAIN

ROOT = Path(__file__).resolve().parents[1]
STAGES = set(ALL_STAGES)
DATA_STAGES = {"vocabulary", "prompts", "generate", "label", "filter"}

MINI = {
    "vocabulary": {"holdout_combination": 4, "holdout_novel_words": 1},
    "prompts": {"requests": 6, "per_request": 4},
    "generate": {"height": 32, "width": 32},
    "pretrain": TINY_PRETRAIN,
    "train": {
        "steps": 4,
        "batch_size": 4,
        "num_sampled": 6,
        "log_every": 2,
        "val_every": 2,
        "offline": {"width": 8, "depth": 2, "embed_dim": 16},
    },
    "evaluate": {"test_samples": 8, "gallery_samples": 2},
}
GIT_ID = ["-c", "user.name=magicseg test", "-c", "user.email=test@magicseg.invalid"]
DVC = [sys.executable, "-m", "dvc"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


def _run(args: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run a command in a project copy, with that copy's own ``src`` on the path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(cwd / "src")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


def _changed(cwd: Path) -> set[str]:
    """Stages ``dvc status`` reports (each one whose own deps, params or outs changed)."""
    return set(json.loads(_run(DVC + ["status", "--json"], cwd)))


@dataclass
class Project:
    root: Path
    remote: Path
    log: str
    params: dict


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A miniature copy of the project in a fresh git + DVC repo, reproduced, committed (with
    dvc.lock and the git-tracked metrics) and pushed to a local DVC remote."""
    # 1. The copy: code, pipeline, profiles and a miniature params file.
    root = tmp_path_factory.mktemp("project")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "stages", "src", "conf", ".gitignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=skip)
        else:
            shutil.copy(src, root / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), MINI)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(DVC + ["init", "-q"], root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")  # the project's, over dvc init's
    _run(DVC + ["config", "core.analytics", "false"], root)
    _run(DVC + ["config", "core.check_update", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", *GIT_ID, "commit", "-qm", "miniature project"], root)

    # 2. Reproduce; commit the lock file and the outputs git tracks (cache: false).
    log = _run(DVC + ["repro"], root)
    remote = tmp_path_factory.mktemp("remote")
    _run(DVC + ["remote", "add", "-d", "local", str(remote)], root)
    _run(["git", "add", "-A"], root)
    _run(["git", *GIT_ID, "commit", "-qm", "reproduced"], root)
    _run(DVC + ["push"], root)
    return Project(root, remote, log, params)


def _clone(project: Project, dest: Path) -> Path:
    """A fresh clone of the project with its cached outputs pulled from the remote."""
    _run(["git", "clone", "-q", str(project.root), str(dest)], project.root.parent)
    _run(DVC + ["pull"], dest)
    return dest


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_outputs(project):
    root = project.root
    assert _ran(project.log) == STAGES
    metrics = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    assert metrics["prompts"]["prompts"] == 24
    assert metrics["label"]["samples"] == 24 and metrics["label"]["oracle_miou"] > 0.3
    assert 0 < metrics["filter"]["kept"] <= 24
    assert metrics["train"]["steps"] == 4
    assert metrics["pretrain"]["steps"] == 2 and 0.0 <= metrics["pretrain"]["top1_heldout"] <= 1
    assert (root / "pretrained/miniclip/model.pt").is_file()
    assert 0.0 <= metrics["eval"]["procedural"]["miou"] <= 1.0
    assert metrics["eval"]["procedural"]["segmenter"] == "trained"
    assert (root / "models/model.pt").is_file()
    assert (root / "plots/evaluate/gallery/procedural.png").is_file()
    assert (root / "plots/evaluate/per_class/procedural.csv").is_file()
    assert (root / "plots/filter/gallery.png").is_file()
    # nothing changed: nothing runs
    assert _ran(_run(DVC + ["repro"], root)) == set()


@pytest.mark.slow
def test_remote_round_trip_fresh_clone_is_up_to_date(project, tmp_path):
    """The team workflow behind `dvc metrics diff` in pull requests."""
    clone = _clone(project, tmp_path / "clone")
    assert (clone / "models/model.pt").is_file() and (clone / "data/filter").is_dir()
    assert _changed(clone) == set()
    assert _ran(_run(DVC + ["repro"], clone)) == set()
    assert json.loads(_run(DVC + ["metrics", "diff", "--json"], clone)) == {}
    assert _run(DVC + ["metrics", "diff"], clone).strip() == ""
    assert json.loads(_run(DVC + ["metrics", "show", "--json"], clone))  # metrics are there


def _append_comment(path: Path):
    original = path.read_text()
    path.write_text(original + "# an edit\n")
    return original


@pytest.mark.slow
def test_editing_the_core_marks_every_stage(project):
    path = project.root / "src/magicseg/core/seeding.py"
    original = _append_comment(path)
    try:
        assert _changed(project.root) == STAGES
    finally:
        path.write_text(original)
    assert _changed(project.root) == set()
    # bytecode Python writes beside the code (the source mtime inside) is not code: .dvcignore
    pyc = project.root / "src/magicseg/core/__pycache__/seeding.cpython-311.pyc"
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(b"bytecode")
    try:
        assert _changed(project.root) == set()
    finally:
        pyc.unlink()


@pytest.mark.slow
@pytest.mark.parametrize(
    "edited, expected",
    [
        ("src/magicseg/training/loop.py", {"train"}),
        ("src/magicseg/model/offline.py", {"train", "evaluate"}),
        ("src/magicseg/miniclip/corpus.py", {"pretrain"}),  # file-level: not train
        ("src/magicseg/miniclip/model.py", {"pretrain", "train", "evaluate"}),
        ("src/magicseg/prompts/openai_writer.py", {"prompts", "check"}),  # the LLM probe
        ("src/magicseg/evaluation/datasets/pascal.py", {"check", "evaluate"}),  # the layouts
        ("src/magicseg/viz.py", {"filter", "evaluate"}),
    ],
)
def test_editing_a_module_marks_only_the_stages_that_run_it(project, edited, expected):
    path = project.root / edited
    original = _append_comment(path)
    try:
        changed = _changed(project.root)
    finally:
        path.write_text(original)
    assert changed == expected
    if edited == "src/magicseg/training/loop.py":
        assert not changed & DATA_STAGES


@pytest.mark.slow
def test_a_label_param_reruns_label_and_what_reads_its_output(project, tmp_path):
    clone = _clone(project, tmp_path / "clone")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["label"]["grounded_proxy"]["miss"] = 0.4  # the default labeler: other masks
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _changed(clone) == {"check", "label"}  # the stages that read label params
    ran = _ran(_run(DVC + ["repro"], clone))
    # new labels flow downstream; the pre-flight passes again with the same report, so
    # prompts and generate (which depend on it) do not run
    assert ran == {"check", "label", "filter", "train", "evaluate"}
    assert (clone / "data/check/report.json").read_text() == (
        project.root / "data/check/report.json"
    ).read_text()


@pytest.mark.slow
def test_a_clean_clone_retrains_to_the_same_bytes(project, tmp_path):
    """Training again from scratch in a fresh clone (no training state there) gives the
    committed model.pt, metrics and curves: git sees no change, evaluate nothing to re-run."""
    clone = _clone(project, tmp_path / "clone")
    assert not (clone / ".cache/magicseg/train").exists()
    ran = _ran(_run(DVC + ["repro", "--force", "--single-item", "train"], clone))
    assert ran == {"train"}
    assert _run(["git", "status", "--porcelain"], clone).strip() == ""
    assert _changed(clone) == set()


def _env(cwd: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(cwd / "src")
    return env


@pytest.mark.slow
def test_killed_dvc_repro_train_resumes_to_the_same_model_bytes(project, tmp_path):
    """SIGKILL of `dvc repro train` (the whole process group) once the first training state
    is written, then `dvc repro train` again: it resumes from that state (DVC deleted the
    stage's outputs, not .cache) and ends with the bytes of an uninterrupted run."""
    clones = {}
    for name in ("whole", "killed"):
        clone = _clone(project, tmp_path / name)
        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["train"].update(steps=200, checkpoint_every=5, val_every=50, log_every=10)
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        clones[name] = clone
    _run(DVC + ["repro", "train"], clones["whole"])

    # 1. Start, wait for the first state, kill dvc and the stage with it.
    killed = clones["killed"]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        DVC + ["repro", "train"], cwd=killed, env=_env(killed), stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((killed / ".cache/magicseg/train").glob("*/state.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no state before the end"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models/model.pt").exists()

    # 2. Again: resumed, and the same bytes as the uninterrupted run.
    out = _run(DVC + ["repro", "train"], killed)
    assert "resuming at step" in out
    for rel in ("models/model.pt", "metrics/train.json", "dvclive/train/metrics.json",
                "dvclive/train/plots/metrics/train/loss.tsv"):  # fmt: skip
        assert (killed / rel).read_bytes() == (clones["whole"] / rel).read_bytes(), rel


# --------------------------------------------------------------------------------------------
# a modern generator and labeler: `dvc exp run -S generator=flux-schnell -S labeler=sam3`
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dvc_exp_run_with_flux_and_sam3_reaches_evaluate(tmp_path):
    """``dvc exp run -S generator=flux-schnell -S labeler=sam3`` (the Hydra groups) on a
    miniature project whose pairs come from a tiny random FLUX.1 [schnell]-type pipeline and whose
    labels from a tiny random SAM 3 (both built here, no hub). Random SAM 3 scores hover at
    0.5 x 0.5, so the instance threshold is lowered and the filter switched off (otherwise every sample is dropped and train has nothing)."""
    from tests.tiny_labelers import save_sam3
    from tests.tiny_models import tiny_flux_pipeline_dir

    # 1. Models and the project copy (hydra on, the committed offline params).
    flux = tiny_flux_pipeline_dir(tmp_path / "models")
    sam3 = save_sam3(tmp_path / "models")
    root = tmp_path / "project"
    root.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("dvc.yaml", "stages", "src", "conf", ".gitignore", "params.yaml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=skip)
        else:
            shutil.copy(src, root / name)
    _run(["git", "init", "-q"], root)
    _run(DVC + ["init", "-q"], root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    for key, value in (("core.analytics", "false"), ("core.check_update", "false"),
                       ("hydra.enabled", "true")):  # fmt: skip
        _run(DVC + ["config", key, value], root)
    _run(["git", "add", "-A"], root)
    _run(["git", *GIT_ID, "commit", "-qm", "miniature project"], root)

    # 2. The run: the labeler group, the two model references, the licence opt-in, sizes.
    sets = {
        "generate.diffusers.checkpoint": flux,
        "generate.diffusers.steps": 1,
        "generate.diffusers.dtype": "float32",
        "generate.height": 32,
        "generate.width": 32,
        "generate.batch_size": 8,
        "label.sam3.checkpoint": sam3,
        "label.sam3.accept_licence": "true",
        "label.sam3.score_threshold": 0.2,
        "filter.enabled": "false",
        "vocabulary.holdout_combination": 4,
        "vocabulary.holdout_novel_words": 1,
        "prompts.requests": 6,
        "prompts.per_request": 4,
        "train.steps": 4,
        "train.batch_size": 4,
        "train.num_sampled": 6,
        "train.log_every": 2,
        "train.val_every": 2,
        "train.offline.width": 8,
        "train.offline.depth": 2,
        "train.offline.embed_dim": 16,
        "evaluate.test_samples": 8,
        "evaluate.gallery_samples": 2,
        **{f"pretrain.{k}": v for k, v in MINI["pretrain"].items()},
    }
    overrides = [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]
    groups = ["-S", "generator=flux-schnell", "-S", "labeler=sam3"]
    run = DVC + ["exp", "run", "-n", "flux-sam3-mini", *groups, *overrides]
    log = _run(run, root, timeout=1500)  # about 11 min on 2 shared cores
    assert _ran(log) == STAGES, log[-3000:]

    import pandas as pd

    # 3. FLUX painted every pair; SAM 3 labelled each, with its presence check; evaluate ran.
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["label"]["backend"] == "sam3" and params["generate"]["backend"] == "diffusers"
    assert params["generate"]["diffusers"]["family"] == "flux"
    gen = pd.read_parquet(root / "data/generate/manifest.parquet")
    assert len(gen) == 24 and (root / "data/generate" / gen["image"].iloc[0]).is_file()
    label = pd.read_parquet(root / "data/label/manifest.parquet")
    assert len(label) == 24 and set(label["backend"]) == {"sam3"}
    metas = [json.loads(m) for m in label["meta"]]
    assert all(
        len(m["presence"]) == len(n) for m, n in zip(metas, label["class_names"], strict=True)
    )
    assert sum(len(b) for b in label["box_scores"]) > 0
    checked = [m for m in metas if m.get("cf_checked")]
    assert checked and all(len(m["cf_presence"]) == len(m["presence"]) for m in checked)
    metrics = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    assert metrics["label"]["samples"] == 24
    assert metrics["train"]["steps"] == 4
    assert 0.0 <= metrics["eval"]["procedural"]["miou"] <= 1.0
    assert metrics["eval"]["procedural"]["segmenter"] == "trained"
