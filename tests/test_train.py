"""Training loop: category sampling, target remapping, losses, checkpoints, determinism."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_train_params

from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import read_manifest, write_manifest
from magicseg.model import build_model, load_checkpoint, save_checkpoint
from magicseg.model.losses import IGNORE, hinge_cos, text_margin
from magicseg.train import (
    BatchSampler,
    compute_loss,
    load_pairs,
    make_logger,
    model_config,
    remap_target,
    sample_classes,
    split_ids,
    train,
)


def test_sample_classes_own_first_unique_trainable(rng):
    trainable = [c for c in range(1, 21) if c not in (4, 9)]
    for _ in range(50):
        s = sample_classes((7, 3), trainable, 6, rng)
        assert s[:2] == [7, 3]
        assert len(s) == 6 and len(set(s)) == 6
        assert set(s) <= set(trainable)
    # more than the vocabulary offers: every trainable class once, own first
    s = sample_classes((5,), trainable, 100, rng)
    assert s[0] == 5 and sorted(s) == trainable
    # fewer slots than own classes: own classes truncated, none added
    assert sample_classes((1, 2, 3), trainable, 2, rng) == [1, 2]
    # the draws vary between calls (random negatives), the own part does not
    draws = {tuple(sample_classes((7,), trainable, 4, rng)[1:]) for _ in range(20)}
    assert len(draws) > 5


def test_remap_target_sampled_space_and_ignore():
    mask = torch.tensor([[0, 5, 5, 2], [9, IGNORE, 0, 2]])
    out = remap_target(mask, [5, 2, 11], num_classes=12)
    # 5 -> slot 1, 2 -> slot 2, unsampled vocabulary class 9 -> ignore, ignore stays ignore
    assert out.tolist() == [[0, 1, 1, 2], [IGNORE, IGNORE, 0, 2]]


def test_hinge_cos_zero_for_orthogonal_positive_for_aligned():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    orth = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert hinge_cos(a, orth).item() == pytest.approx(0.0)
    assert hinge_cos(a, -a).item() == pytest.approx(0.0)  # opposite: clamped, no push
    assert hinge_cos(a, 5 * a).item() == pytest.approx(1.0)
    half = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert hinge_cos(a, half).item() == pytest.approx(2**-0.5, abs=1e-6)


def test_text_margin_loss():
    t = torch.tensor([[[1.0, 0.0]]])  # one image, one class embedding
    valid = torch.tensor([[True]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # positive on the text, counterfactual orthogonal: gap 1 >= margin 0.2 -> 0
    assert text_margin(pos, neg, t, valid, 0.2).item() == pytest.approx(0.0)
    # swapped: gap -1 -> 0.2 + 1
    assert text_margin(neg, pos, t, valid, 0.2).item() == pytest.approx(1.2)
    # invalid (image, class) pairs do not count
    assert text_margin(neg, pos, t, torch.tensor([[False]]), 0.2).item() == 0.0


def test_split_is_stable_per_id():
    ids = [f"r{i:06d}-000" for i in range(2000)]
    val = split_ids(ids, 0.1, seed=0)
    assert 0.07 < val.mean() < 0.13
    # membership depends on the id (and the seed) only, not on order or the other ids
    assert split_ids(ids[::-1], 0.1, seed=0)[::-1].tolist() == val.tolist()
    assert split_ids(ids[:100], 0.1, seed=0).tolist() == val[:100].tolist()
    other = split_ids(ids, 0.1, seed=1)
    assert other.tolist() != val.tolist() and 0.07 < other.mean() < 0.13


def _batch(tiny_data, tiny_encoder, params, seed=0):
    vocab_dir, filter_dir, vocab = tiny_data
    data = load_pairs(filter_dir, vocab)
    feats = tiny_encoder.encode(list(vocab.names))
    return BatchSampler(data, feats, vocab.trainable, params, seed).next()


def test_batch_targets_follow_sampled_classes(tiny_data, tiny_encoder):
    params = tiny_train_params(batch_size=6, num_sampled=7)
    batch = _batch(tiny_data, tiny_encoder, params)
    assert batch.images.shape == (6, 3, 32, 32) and batch.cf_images.shape == (6, 3, 32, 32)
    assert batch.features.shape == (6, 7, tiny_encoder.dim)
    assert batch.target.min() >= IGNORE and batch.target.max() <= 7
    # own classes occupy the first slots, so every foreground pixel is labelled 1 or 2
    fg = batch.target[batch.target > 0]
    assert fg.numel() > 0 and fg.max() <= 2
    assert batch.own[:, 0].all() and not batch.own[:, 2:].any()


@pytest.mark.parametrize(
    "cf_loss", ["none", "hinge_head", "hinge_pixels", "cf_background", "text_margin"]
)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data, tiny_encoder, cf_loss):
    overrides = {"cf_weight": 0.0} if cf_loss == "none" else {"cf_weight": 0.5, "cf_loss": cf_loss}
    params = tiny_train_params(batch_size=8, **overrides)
    batch = _batch(tiny_data, tiny_encoder, params)
    torch.manual_seed(0)
    model = build_model("offline", model_config(params), tiny_encoder.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, parts = compute_loss(model, batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        if cf_loss != "none":
            assert parts["cf_loss"] >= 0.0
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip_same_outputs(tmp_path, tiny_encoder):
    params = tiny_train_params()
    torch.manual_seed(0)
    model = build_model("offline", model_config(params), tiny_encoder.dim).eval()
    names = ["red ball", "blue box", "green kite"]
    save_checkpoint(
        tmp_path / "m.pt", model, "offline", model_config(params), "tiny", names, [2], (32, 32)
    )
    ckpt = load_checkpoint(tmp_path / "m.pt", text_encoder=tiny_encoder)
    assert ckpt.vocab == names and ckpt.holdout == [2] and ckpt.image_size == (32, 32)
    assert ckpt.model_name == "offline" and ckpt.model_config["width"] == 8
    images = torch.rand(2, 3, 32, 32)
    feats = tiny_encoder.encode(names)
    with torch.no_grad():
        a, b = model(images, feats), ckpt.model(images, feats)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.global_embedding, b.global_embedding)


def test_load_checkpoint_rejects_other_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a magicseg checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_train_writes_checkpoint_curves_and_is_deterministic(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_train_params(cf_weight=0.1, cf_loss="hinge_head")
    m1 = train(filter_dir, vocab_dir, params, 0, tmp_path / "a", tmp_path / "live", tiny_encoder)
    m2 = train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, tiny_encoder)
    assert m1["steps"] == 3 and m1["samples_train"] + m1["samples_val"] == 12
    assert m1["samples_val"] > 0 and 0.0 <= m1["val_miou"] <= 1.0
    assert m1["loss"] == m2["loss"] and m1["val_miou"] == m2["val_miou"]
    s1 = torch.load(tmp_path / "a/model.pt", weights_only=True)
    s2 = torch.load(tmp_path / "b/model.pt", weights_only=True)
    assert all(torch.equal(s1["state_dict"][k], s2["state_dict"][k]) for k in s1["state_dict"])
    assert s1["vocab"] == list(vocab.names) and s1["holdout"] == sorted(vocab.holdout)
    assert s1["config"] == {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    # dvclive curves, and no dvc.yaml written anywhere
    loss_tsv = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_tsv[0].split("\t") == ["step", "loss"] and len(loss_tsv) == 4
    assert (tmp_path / "live/plots/metrics/val/miou.tsv").is_file()
    assert (tmp_path / "live/plots/metrics/train/lr.tsv").is_file()
    assert not list(tmp_path.rglob("dvc.yaml"))
    # another seed trains differently
    m3 = train(filter_dir, vocab_dir, params, 1, tmp_path / "c", None, tiny_encoder)
    assert m3["loss"] != m1["loss"]


def test_held_out_class_in_training_data_is_refused(tmp_path, tiny_data):
    vocab_dir, filter_dir, vocab = tiny_data
    frame = read_manifest(filter_dir)
    held = sorted(vocab.holdout)[0]
    frame.at[0, "class_ids"] = [held]
    frame["image"] = [str((filter_dir / p).resolve()) for p in frame["image"]]
    frame["cf_image"] = [str((filter_dir / p).resolve()) for p in frame["cf_image"]]
    frame["mask"] = [str((filter_dir / p).resolve()) for p in frame["mask"]]
    write_manifest(tmp_path, frame)
    with pytest.raises(DataError, match="held-out class"):
        load_pairs(tmp_path, vocab)


def test_wandb_logger_without_wandb_is_a_config_error():
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="wandb"):
        make_logger("wandb", None, {})


def test_train_without_validation_split_reports_none(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(val_fraction=0.0, steps=1)
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, tiny_encoder)
    assert m["samples_val"] == 0 and m["samples_train"] == 12
    assert m["val_miou"] is None and m["num_params"] > 0
