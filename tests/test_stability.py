"""Stability levers: ``train.precision`` (auto = fp32 on a CPU), ``train.deterministic``,
``train.ema`` (the average by hand, the saved model is the average, resume keeps it), and the
seeds that keep the held-out classes (``vocabulary.holdout_seed``) and the test set
(``evaluate.test_seed``) fixed while the global seed changes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tests.conftest import tiny_train_params
from torch import nn

from magicseg.core.config import EvaluateParams, Params, VocabularyParams
from magicseg.core.io import read_json
from magicseg.evaluation.stage import run_evaluate
from magicseg.model import build_model, save_checkpoint
from magicseg.training.loop import STATE, train
from magicseg.training.stability import Ema, autocast_dtype, set_deterministic

ROOT = Path(__file__).resolve().parents[1]


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None


def test_ema_by_hand_with_its_warm_up():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = Ema(lin, decay=0.9)
    expected = 1.0
    for t, w in enumerate([2.0, 4.0, 4.0]):
        with torch.no_grad():
            lin.weight.fill_(w)
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, 0.1818, 0.25
        expected = d * expected + (1 - d) * w
        ema.update(lin)
    assert ema.shadow["weight"].item() == pytest.approx(expected)
    assert expected == pytest.approx(0.25 * (0.1818182 * (0.1 + 0.9 * 2) + 0.8181818 * 4) + 3)
    with ema.applied(lin):
        assert lin.weight.item() == pytest.approx(expected)
    assert lin.weight.item() == 4.0  # restored
    other = Ema(lin, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.shadow["weight"].item() == pytest.approx(expected) and other.updates == 3
    with pytest.raises(ValueError, match="decay"):
        Ema(lin, decay=1.0)


def test_ema_averages_batchnorm_statistics_not_counters():
    bn = nn.BatchNorm2d(2)
    ema = Ema(bn, 0.5)
    assert set(ema.shadow) == {"weight", "bias", "running_mean", "running_var"}


def _trained(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_with_ema_saves_the_average_and_resumes_it(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(steps=6, checkpoint_every=2, log_every=2, val_every=3, ema=0.8)
    state = tmp_path / "state"
    train(filter_dir, vocab_dir, params, 0, tmp_path / "a", None, state, tiny_encoder)
    (key,) = list(state.iterdir())
    blob = torch.load(key / STATE, weights_only=False)
    shadow, saved = blob["ema"]["shadow"], _trained(tmp_path / "a/model.pt")
    assert blob["ema"]["updates"] == 6
    for name, value in shadow.items():  # the saved model is the average, not the last step
        assert torch.equal(saved[name].float(), value), name
    assert any(not torch.equal(blob["model"][n].float(), shadow[n]) for n in shadow)
    # without the average: other weights
    plain = params.model_copy(update={"ema": None})
    train(filter_dir, vocab_dir, plain, 0, tmp_path / "p", None, None, tiny_encoder)
    assert (tmp_path / "p/model.pt").read_bytes() != (tmp_path / "a/model.pt").read_bytes()
    # killed at step 3 and resumed: the same bytes
    state2 = tmp_path / "state2"
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state2, tiny_encoder, stop_at=3)
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state2, tiny_encoder)
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()


def test_deterministic_training_repeats_and_leaves_the_flag_off(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(deterministic=True)
    for name in ("a", "b"):
        train(filter_dir, vocab_dir, params, 0, tmp_path / name, None, None, tiny_encoder)
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    assert not torch.are_deterministic_algorithms_enabled()
    set_deterministic(True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False)


def test_bad_lever_values_name_the_key():
    from magicseg.core.config import TrainParams

    for bad, key in (({"ema": 1.0}, "ema"), ({"precision": "fp16"}, "precision"),
                     ({"deterministic": "maybe"}, "deterministic")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            TrainParams.model_validate(bad)
    with pytest.raises(ValueError, match="holdout_seed"):
        VocabularyParams(holdout_seed=-1)
    with pytest.raises(ValueError, match="test_seed"):
        EvaluateParams(test_seed=-2)


def _vocabulary_stage(tmp_path, seed: int, holdout_seed: int | None) -> pd.DataFrame:
    from stages.vocabulary import main

    data = Params().model_dump(mode="json")
    data["seed"] = seed
    data["vocabulary"]["holdout_seed"] = holdout_seed
    params = tmp_path / f"params-{seed}-{holdout_seed}.yaml"
    params.write_text(yaml.safe_dump(data))
    out = tmp_path / f"vocab-{seed}-{holdout_seed}"
    main(out=out, params_file=params)
    return pd.read_parquet(out / "manifest.parquet")


def test_holdout_seed_fixes_the_held_out_classes_across_global_seeds(tmp_path):
    assert VocabularyParams().holdout_seed_for(7) == 7
    assert VocabularyParams(holdout_seed=3).holdout_seed_for(7) == 3
    a, b = (_vocabulary_stage(tmp_path, s, None) for s in (0, 1))
    assert not a.equals(b)  # today's default: the seed re-draws the held-out classes
    fixed = [_vocabulary_stage(tmp_path, s, 0) for s in (1, 2)]
    assert fixed[0].equals(fixed[1]) and fixed[0].equals(a)


def test_test_seed_fixes_the_test_set_across_global_seeds(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, _, vocab = tiny_data
    torch.manual_seed(0)
    cfg = {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    model = build_model("offline", cfg, tiny_encoder.dim).eval()
    tiny_checkpoint = tmp_path / "model.pt"
    save_checkpoint(tiny_checkpoint, model, "offline", cfg, "tiny", list(vocab.names),
                    sorted(vocab.holdout), (32, 32))  # fmt: skip

    def evaluate(seed: int, test_seed: int | None) -> dict:
        params = EvaluateParams(test_samples=16, batch_size=16, gallery_samples=0,
                                test_seed=test_seed)  # fmt: skip
        path = tmp_path / f"eval-{seed}-{test_seed}.json"
        run_evaluate(tiny_checkpoint, vocab_dir, params, seed=seed, metrics_path=path,
                     text_encoder=tiny_encoder)  # fmt: skip
        return read_json(path)["procedural"]

    assert evaluate(1, 0) == evaluate(2, 0) == evaluate(0, None)
    assert evaluate(1, None) != evaluate(0, None)  # the seed re-draws the test set


def _benchmark():
    import importlib.util

    path = ROOT / "benchmarks/stability.py"
    spec = importlib.util.spec_from_file_location("stability_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stability_summary_is_that_of_its_runs():
    bench = _benchmark()
    data = json.loads((ROOT / "metrics/stability.json").read_text())
    assert bench.summarize(data["runs"], data["config"]["seeds"]) == data["summary"]
    assert set(data["runs"]) >= set(bench.runs_of(data["config"]["seeds"], data["config"]["ema"]))


def test_readme_noise_table_is_the_committed_stability_run():
    bench = _benchmark()
    data = json.loads((ROOT / "metrics/stability.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(bench.README_START)[1].split(bench.README_END)[0]
    assert block.strip() == bench.readme_block(data), (
        "copy them with: python benchmarks/stability.py --readme"
    )
    seen = data["summary"]["seeds"]["miou_seen"]["std"]
    assert f"| std over seeds (fp32, 1 thread) | {seen:.3f} |" in block


def test_the_benchmarks_table_by_hand():
    bench = _benchmark()
    runs = {
        "fp32/t1/s0": {"miou_seen": 0.20, "miou_heldout": 0.05, "miou_heldout_novel": None},
        "fp32/t1/s1": {"miou_seen": 0.22, "miou_heldout": 0.07, "miou_heldout_novel": None},
        "fp32/t2/s0": {"miou_seen": 0.19, "miou_heldout": 0.05, "miou_heldout_novel": None},
        "bf16/t1/s0": {"miou_seen": 0.25, "miou_heldout": 0.04, "miou_heldout_novel": None},
        "fp32+ema/t1/s0": {"miou_seen": 0.21, "miou_heldout": 0.06, "miou_heldout_novel": 0.0},
        "fp32+ema/t1/s1": {"miou_seen": 0.21, "miou_heldout": 0.06, "miou_heldout_novel": 0.0},
    }
    s = bench.summarize(runs, [0, 1])
    assert s["seeds"]["miou_seen"]["std"] == pytest.approx(0.0141, abs=1e-4)
    assert (
        s["seeds"]["miou_heldout_novel"]["std"] is None and s["seeds_ema"]["miou_seen"]["std"] == 0
    )
    assert s["threads_fp32"]["miou_seen"] == 0.01 and s["precision"]["miou_seen"] == 0.05
    assert s["threads_bf16"] == {}  # bf16 at 2 threads not run
    config = {"seeds": [0, 1], "steps": 5, "batch_size": 2, "size": 32, "samples": 10,
              "classes": 20, "num_sampled": 20, "test_samples": 4, "ema": 0.9}  # fmt: skip
    block = bench.readme_block({"config": config, "summary": s})
    assert "| std over seeds (fp32, 1 thread) | 0.014 | 0.014 | – |" in block
    assert "| \\|fp32 − bf16\\| (1 thread) | 0.050 | 0.010 | – |" in block
    assert "(bf16)" not in block
