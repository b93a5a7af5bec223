"""`dvc exp run -S profile=paper` end to end, on a miniature copy of the project.

The only overrides are the ones a test cannot do without: the four model references (tiny
checkpoints built here, :mod:`tests.paper_fixtures`), the ``openai`` writer's endpoint (a
loopback OpenAI-compatible server whose answers mention the requested classes), sizes and
counts made small, the benchmark roots (miniature VOC 2012, VOC 2010 + Context and COCO
trees written here), and Stable Diffusion's precision where the profile asks for float16,
which has no CPU kernels here. Everything else is what ``conf/profile/paper.yaml`` says, whatever it says:
the full LVIS vocabulary (1203 classes, uint16 masks), Grounded-SAM labels with the
counterfactual check, the paper's filter, the CLIP segmenter, the real benchmarks.

A second group runs the same profile with one broken input each and checks that the ``check``
stage stops the run before ``prompts`` and ``generate``, in one line naming the key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from tests.chat_server import ChatServer
from tests.helpers import STAGES as ALL_STAGES
from tests.paper_fixtures import make_coco, paper_models
from tests.real_dataset_fixtures import make_context, make_voc

ROOT = Path(__file__).resolve().parents[1]
STAGES = set(ALL_STAGES)
SIZE, STEPS = 64, 1  # generated images (px) and denoising steps
DVC = [sys.executable, "-m", "dvc"]


def _paper_profile(out: Path) -> dict:
    """params.yaml as ``-S profile=paper`` composes it (no other override), written to ``out``."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), ["profile=paper"])
    return yaml.safe_load(out.read_text())


def _env(project: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    e["PYTHONPATH"] = str(project / "src")
    e.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        OPENAI_API_KEY="EMPTY",  # a local server without auth; the variable must be set
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", log))


@dataclass
class Paper:
    root: Path
    log: str
    overrides: list[str]
    server: ChatServer
    trees: dict[str, Path]


def _overrides(models: dict[str, Path], server: ChatServer, trees: dict[str, Path]) -> list[str]:
    """Model references, the writer's endpoint, sizes and counts, benchmark roots: nothing
    else."""
    sets = {
        # the four models
        "generate.diffusers.checkpoint": models["sd"],
        "label.grounded_sam.detector_checkpoint": models["detector"],
        "label.grounded_sam.sam_checkpoint": models["sam"],
        "train.clip.checkpoint": models["clip"],
        # the LLM endpoint
        "prompts.openai.base_url": f"'{server.base_url}'",
        # sizes and counts
        "prompts.requests": 32,
        "prompts.per_request": 2,
        "generate.height": SIZE,
        "generate.width": SIZE,
        "generate.batch_size": 4,
        "generate.diffusers.steps": STEPS,
        # the one precision override the CPU forces: float16 has no CPU kernels here
        "generate.diffusers.dtype": "float32",
        "label.grounded_sam.batch_size": 8,
        "train.steps": 2,
        "train.batch_size": 2,
        "train.log_every": 1,
        "train.val_every": 1,
        "train.num_threads": 1,
        "train.crop": SIZE,
        "train.num_workers": 0,
        "train.clip.decoder_layers": 1,
        "train.clip.decoder_heads": 2,
        "train.clip.decoder_dim": 16,  # = the tiny CLIP's joint dim (the atm decoder needs it)
        "train.warmup": 1,
        "evaluate.short_side": 48,
        "evaluate.window": 48,
        "evaluate.stride": 32,
        "evaluate.gallery_samples": 1,
        # benchmark roots
        "evaluate.voc.root": trees["voc"],
        "evaluate.context.root": trees["context"],
        "evaluate.coco_object.root": trees["coco_object"],
    }
    return [a for k, v in sets.items() for a in ("-S", f"{k}={v}")]


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> Paper:
    """A miniature project (git + DVC, Hydra composition on) run with ``dvc exp run -S
    profile=paper`` and the overrides of :func:`_overrides`."""
    # 1. Models, benchmark trees, the LLM server.
    work = tmp_path_factory.mktemp("paper")
    profile = _paper_profile(work / "paper-params.yaml")
    threshold = profile["label"]["grounded_sam"]["box_threshold"]
    scheduler = profile["generate"]["diffusers"]["scheduler"]
    models = paper_models(work / "models", SIZE, STEPS, threshold, scheduler)
    voc, _ = make_voc(work / "datasets", size=(40, 56))
    context, _ = make_context(work / "datasets", size=(40, 56))
    trees = {"voc": voc, "context": context, "coco_object": make_coco(work / "datasets")}
    server = ChatServer(lifetime=900, models=[profile["prompts"]["openai"]["llm"]])
    server.__enter__()

    # 2. The project: code, pipeline, profiles, the committed default params.
    root = work / "project"
    root.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    # pretrained/: the committed miniature CLIP (its key matches: only its report is redone)
    for name in ("dvc.yaml", "stages", "src", "conf", ".gitignore", "params.yaml", "pretrained"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name, **(
            {"ignore": skip} if src.is_dir() else {}))  # fmt: skip
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.name", "magicseg test"], root)
    _run(["git", "config", "user.email", "test@magicseg.invalid"], root)
    _run(DVC + ["init", "-q"], root)
    for key, value in (("core.analytics", "false"), ("core.check_update", "false"),
                       ("hydra.enabled", "true")):  # fmt: skip
        _run(DVC + ["config", key, value], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "miniature project"], root)

    # 3. The paper's setting.
    overrides = _overrides(models, server, trees)
    proc = _run(DVC + ["exp", "run", "-n", "paper-mini", "-S", "profile=paper", *overrides], root)
    yield Paper(root, proc.stdout + proc.stderr, overrides, server, trees)
    server.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_stage_ran_with_the_paper_profile(paper):
    params = yaml.safe_load((paper.root / "params.yaml").read_text())
    assert params["profile"] == "paper" and params["vocabulary"]["source"] == "lvis"
    assert _ran(paper.log) == STAGES, paper.log[-3000:]
    assert json.loads((paper.root / "data/check/report.json").read_text())["passed"] is True
    vocab = pd.read_parquet(paper.root / "data/vocabulary/manifest.parquet")
    assert len(vocab) == 1203
    # the LLM writer, through the loopback server
    prompts = json.loads((paper.root / "metrics/prompts.json").read_text())
    assert prompts["requests"] == 32 and prompts["usage"]["calls"] == paper.server.calls > 0
    assert all(b["model"] == params["prompts"]["openai"]["llm"] for b in paper.server.bodies)
    train = json.loads((paper.root / "metrics/train.json").read_text())
    assert train["steps"] == 2 and train["samples_train"] >= 1
    assert (paper.root / "models/model.pt").is_file()


@pytest.mark.slow
def test_grounded_sam_columns_uint16_masks_and_the_filters_reasons(paper):
    from magicseg.core.config import FilterParams
    from magicseg.core.io import read_mask
    from magicseg.filter import REASONS, reasons_for

    params = yaml.safe_load((paper.root / "params.yaml").read_text())
    label = pd.read_parquet(paper.root / "data/label/manifest.parquet")
    made = json.loads((paper.root / "metrics/prompts.json").read_text())["prompts"]
    assert len(label) == made > 0 and set(label["backend"]) == {"grounded_sam"}
    gsam = {"scores", "boxes", "box_classes", "box_scores", "cf_detected", "cf_agreement"}
    assert gsam <= set(label.columns)
    detected = label[label["box_scores"].map(len) > 0]
    assert 0 < len(detected) < len(label)  # the steered detector finds some, not all
    if params["label"]["grounded_sam"]["cf_check"]:  # one flag per class of the sample
        pairs = zip(detected["cf_detected"], detected["class_names"], strict=True)
        assert all(len(c) == len(n) for c, n in pairs)
    else:
        assert label["cf_detected"].isna().all()
    row = detected[detected["box_classes"].map(max) > 255].iloc[0]  # a box beyond 8 bits
    with Image.open(paper.root / "data/label" / row["mask"]) as png:
        assert png.mode == "I;16"  # 1203 classes: 16-bit class indices
    values = set(np.unique(read_mask(paper.root / "data/label" / row["mask"]))) - {0}
    best = row["box_classes"][int(np.argmax(row["box_scores"]))]
    assert best in values and values <= set(row["box_classes"]) <= set(row["class_ids"])

    # every sample's decision and reasons, under the profile's filter, whatever it says
    decisions = pd.read_parquet(paper.root / "data/filter/decisions.parquet")
    expected = [reasons_for(r, FilterParams(**params["filter"])) for _, r in label.iterrows()]
    assert decisions["id"].tolist() == label["id"].tolist()
    assert [list(r) for r in decisions["reasons"]] == expected
    if params["filter"]["enabled"]:
        assert decisions["kept"].tolist() == [not r for r in expected]
    else:  # the filter off: reasons are flags; only the samples without a mask are dropped
        maskless = {"unreadable", "no_detection"}
        assert decisions["kept"].tolist() == [not set(r) & maskless for r in expected]
        assert (decisions["kept"] & decisions["reasons"].map(len).gt(0)).any()  # flagged, kept
    assert {r for rs in expected for r in rs} <= set(REASONS)
    assert "no_detection" in {r for rs in expected for r in rs}  # nothing detected: dropped
    kept = pd.read_parquet(paper.root / "data/filter/manifest.parquet")
    assert 0 < len(kept) == decisions["kept"].sum()


@pytest.mark.slow
def test_published_generation_switches_reach_the_files(paper):
    """The literal "nothing" rewrite, independent (seeded) pair noise and JPEG files of the
    paper profile, through the stages: prompts, generate, label."""
    from magicseg.prompts.counterfactual import literal_counterfactual

    prompts = pd.read_parquet(paper.root / "data/prompts/manifest.parquet")
    for row in prompts.itertuples():
        assert row.cf_prompt == literal_counterfactual(row.prompt, list(row.class_names))
    gen = pd.read_parquet(paper.root / "data/generate/manifest.parquet")
    assert all(p.endswith(".jpg") for p in [*gen["image"], *gen["cf_image"]])
    assert (paper.root / "data/generate" / gen["image"].iloc[0]).read_bytes()[:3] == b"\xff\xd8\xff"
    meta = json.loads(gen["meta"].iloc[0])
    assert meta["shared_latents"] is False and meta["cf_seed"] != meta["seed"]
    label = pd.read_parquet(paper.root / "data/label/manifest.parquet")
    assert all(p.endswith(".jpg") for p in label["image"])


@pytest.mark.slow
def test_every_enabled_benchmark_has_its_metrics(paper):
    metrics = json.loads((paper.root / "metrics/eval.json").read_text())
    params = yaml.safe_load((paper.root / "params.yaml").read_text())["evaluate"]
    context = {"pc59": ("context", "context60"), "pc60_text": ("context60_text",)}
    expected = {"voc": ("voc", "voc20"), "context": context[params["context"]["protocol"]],
                "coco_object": ("coco_object",), "lvis": ("lvis",)}  # fmt: skip
    images = {"voc": 3, "context": 2, "coco_object": 2}
    enabled = [n for n in expected if params[n]["enabled"]]
    assert enabled and set(enabled) <= set(images)  # the profile's benchmarks have trees here
    assert set(metrics) == {v for n in enabled for v in expected[n]}  # no procedural set
    for name in enabled:
        for variant in expected[name]:
            m = metrics[variant]
            assert m["segmenter"] == "trained" and m["images"] == images[name]
            assert 0.0 <= m["miou"] <= 1.0 and m["classes_scored"] >= 1
            assert (paper.root / f"plots/evaluate/per_class/{variant}.csv").is_file()


@pytest.mark.slow
def test_dvc_exp_show_lists_the_experiment(paper):
    shown = json.loads(_run(DVC + ["exp", "show", "--json"], paper.root).stdout)
    names = [e.get("name") for row in shown for e in (row.get("experiments") or [])]
    assert "paper-mini" in names
    assert _ran(_run(DVC + ["repro"], paper.root).stdout) == set()  # nothing left to run


@pytest.mark.slow
def test_the_design_cards_num_sampled_50_on_this_profile(paper):
    """`dvc exp run -S train.num_sampled=50` (the design card's example) on the paper profile:
    50 of the 1203 classes scored per image; the pre-flight, train and evaluate re-run."""
    args = [*paper.overrides, "-S", "train.num_sampled=50"]
    proc = _run(DVC + ["exp", "run", "-S", "profile=paper", *args], paper.root)
    assert _ran(proc.stdout + proc.stderr) == {"check", "train", "evaluate"}
    params = yaml.safe_load((paper.root / "params.yaml").read_text())
    assert params["profile"] == "paper" and params["train"]["num_sampled"] == 50
    train = json.loads((paper.root / "metrics/train.json").read_text())
    assert train["steps"] == 2 and (paper.root / "models/model.pt").is_file()


# --------------------------------------------------------------------------------------------
# broken inputs stop in the check stage
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value, culprit",
    [
        ("evaluate.voc.root", "{work}/datasets/missing/VOC2012", "does not hold"),
        ("generate.diffusers.checkpoint", "{work}/models/no-such-sd", "does not exist"),
    ],
    ids=["benchmark_root_missing", "model_dir_missing"],
)
def test_a_broken_input_fails_in_the_check_stage_in_one_line(paper, key, value, culprit):
    value = value.format(work=paper.root.parent)
    args = [*paper.overrides, "-S", f"{key}={value}"]
    proc = _run(DVC + ["exp", "run", "-S", "profile=paper", *args], paper.root, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "check" in _ran(log) and not _ran(log) & {"prompts", "generate"}, log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, log[-3000:]
    assert errors[0].startswith(f"error: {key}: {value} ") and culprit in errors[0]


@pytest.mark.slow
def test_a_clip_of_another_joint_dimension_stops_in_the_check_stage(paper):
    """The stand-in CLIP projects to 16; the profile's atm decoder at decoder_dim 32 would fail
    in train after generation and labeling: the pre-flight refuses it first, in one line."""
    args = [*paper.overrides, "-S", "train.clip.decoder_dim=32"]
    proc = _run(DVC + ["exp", "run", "-S", "profile=paper", *args], paper.root, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "check" in _ran(log) and not _ran(log) & {"prompts", "generate"}, log[-3000:]
    clip = next(a.split("=", 1)[1] for a in paper.overrides if a.startswith("train.clip.checkp"))
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert errors == [
        "error: train.clip.decoder_dim: the atm decoder works in CLIP's joint space: "
        f"{clip} has projection_dim 16, got 32; set train.clip.decoder_dim=16"
    ], log[-3000:]
