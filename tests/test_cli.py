"""The command line: predict with a checkpoint (real offline MiniLM text encoder), info."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

from magicseg.cli import app
from magicseg.core.io import read_image, read_mask, write_image
from magicseg.model import build_model, save_checkpoint

runner = CliRunner()


def _checkpoint(path):
    torch.manual_seed(0)
    cfg = {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    model = build_model("offline", cfg, 384).eval()
    save_checkpoint(path, model, "offline", cfg, "minilm", ["red ball", "blue box"], [], (32, 32))


def test_predict_writes_mask_and_overlay(tmp_path):
    _checkpoint(tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    write_image(tmp_path / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    write_image(tmp_path / "b.png", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    result = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "a.png"),
            str(tmp_path / "b.png"),
            "--classes",
            "red ball, green kite,blue box",
            "--checkpoint",
            str(tmp_path / "model.pt"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    for name, shape in (("a", (32, 32)), ("b", (48, 40))):
        mask = read_mask(tmp_path / f"out/{name}.mask.png")
        assert mask.shape == shape
        assert mask.min() >= 0 and mask.max() <= 3
        overlay = read_image(tmp_path / f"out/{name}.overlay.png")
        assert overlay.shape[1] >= shape[1] and overlay.shape[0] > shape[0]
    assert result.output.count(".png: {") == 2


def test_predict_user_errors_exit_2_with_one_line(tmp_path):
    _checkpoint(tmp_path / "model.pt")
    write_image(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    missing = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "nope.png"),
            "--classes",
            "a",
            "--checkpoint",
            str(tmp_path / "model.pt"),
        ],
    )
    assert missing.exit_code == 2
    assert "cannot read image" in missing.output and len(missing.output.strip().splitlines()) == 1
    no_ckpt = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "a.png"),
            "--classes",
            "a",
            "--checkpoint",
            str(tmp_path / "x.pt"),
        ],
    )
    assert no_ckpt.exit_code == 2 and "checkpoint not found" in no_ckpt.output
    empty = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "a.png"),
            "--classes",
            " , ",
            "--checkpoint",
            str(tmp_path / "model.pt"),
        ],
    )
    assert empty.exit_code == 2 and "--classes" in empty.output


def test_info_lists_backends_and_profile(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: offline\ntrain:\n  architecture: offline\n")
    result = runner.invoke(app, ["info", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "profile: offline" in result.output
    assert "models: clip, minizeg, offline" in result.output
    assert "text encoders: clip, minilm" in result.output
    assert "offline (yes)" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  num_sampled: 0\n")
    result = runner.invoke(app, ["info", "--params", str(bad)])
    assert result.exit_code == 2 and "train.num_sampled" in result.output
