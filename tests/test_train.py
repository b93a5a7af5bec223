"""The training loop: streamed data, category sampling, target remapping, losses, schedule,
checkpoints, determinism (same bytes), resume, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import tiny_train_params

from magicseg.core.config import TrainParams
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import read_manifest, write_manifest
from magicseg.model import build_model, load_checkpoint, save_checkpoint
from magicseg.model.base import Batch
from magicseg.model.losses import IGNORE, hinge_cos, pixel_loss, text_margin
from magicseg.training.data import (
    BatchPlan,
    StepBatches,
    TrainItems,
    batch_at,
    cf_rows,
    collate,
    loader,
    read_index,
    remap_target,
    sample_classes,
    split_ids,
)
from magicseg.training.loggers import make_logger
from magicseg.training.loop import STATE, TIMING, lr_factor, make_optimizer, model_config, train


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


def test_pixel_loss_is_torchs_weighted_cross_entropy_and_splits_into_halves():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 6, generator=g)
    target = torch.randint(0, 5, (4, 6, 6), generator=g)
    target[0, :2] = IGNORE
    w = torch.tensor([0.1, 1, 1, 1, 1])
    want = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    assert torch.allclose(pixel_loss(logits, target, 0.1), want, atol=1e-6)
    assert pixel_loss(logits, torch.full_like(target, IGNORE), 0.1).item() == 0.0


def test_split_is_stable_per_id():
    ids = [f"r{i:06d}-000" for i in range(2000)]
    val = split_ids(ids, 0.1, seed=0)
    assert 0.07 < val.mean() < 0.13
    # membership depends on the id (and the seed) only, not on order or the other ids
    assert split_ids(ids[::-1], 0.1, seed=0)[::-1].tolist() == val.tolist()
    assert split_ids(ids[:100], 0.1, seed=0).tolist() == val[:100].tolist()
    other = split_ids(ids, 0.1, seed=1)
    assert other.tolist() != val.tolist() and 0.07 < other.mean() < 0.13


def _items(tiny_data, params, seed=0):
    _, filter_dir, vocab = tiny_data
    index = read_index(filter_dir, vocab)
    plan = BatchPlan(len(index), params.batch_size, seed)
    return TrainItems(index, plan, vocab.trainable, params.num_sampled, params, seed), vocab


def test_a_sample_of_another_size_is_read_past_the_cache(tiny_data, monkeypatch):
    """The in-memory arrays are sized from sample 0; a larger sample is read from disk each
    time, whole, and the others are still cached."""
    import magicseg.training.data as D

    params = tiny_train_params(batch_size=4, num_sampled=5)
    reads: list[int] = []
    real_read = D.PairIndex.read

    def read(self, i, **k):
        reads.append(i)
        image, cf, mask = real_read(self, i, **k)
        if i == odd:  # twice the size
            image, cf, mask = (a.repeat(2, 0).repeat(2, 1) for a in (image, cf, mask))
        return image, cf, mask

    monkeypatch.setattr(D.PairIndex, "read", read)
    items, _ = _items(tiny_data, params)
    odd = next(s for s in range(1, len(items.index)) if s != items.plan.sample(0))
    positions = [i for i in range(400) if items.plan.sample(i) == odd][:2]
    assert len(positions) == 2
    h, w = items.index.read(items.plan.sample(0))[0].shape[:2]
    reads.clear()
    for i in positions + positions:
        assert tuple(items[i]["target"].shape) == (2 * h, 2 * w)
    assert reads.count(odd) == 4  # never cached
    items[0], items[0]
    assert reads.count(items.plan.sample(0)) == 1  # read once, then cached


def _batch(tiny_data, tiny_encoder, params, seed=0, step=0) -> Batch:
    items, vocab = _items(tiny_data, params, seed)
    return batch_at(items, step, tiny_encoder.encode(list(vocab.names)))


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
    assert batch.cf_rows.all()


def test_decoded_samples_are_kept_in_memory_only_when_they_fit(tiny_data, monkeypatch):
    import magicseg.training.data as D

    params = tiny_train_params(batch_size=4, num_sampled=5)
    reads = []
    real_read = D.PairIndex.read
    monkeypatch.setattr(
        D.PairIndex, "read", lambda self, i, **k: reads.append(i) or real_read(self, i, **k)
    )
    cached, _ = _items(tiny_data, params)
    first = [cached[i] for i in range(12)]
    n_first = len(reads)
    again = [cached[i] for i in range(12)]  # the same positions: no second read
    assert 0 < n_first <= 12 and len(reads) == n_first
    monkeypatch.setattr(D, "READ_CACHE_BYTES", 0)
    plain, _ = _items(tiny_data, params)
    assert plain._cache is None and cached._cache is not None
    reads.clear()
    fresh = [plain[i] for i in range(12)]
    assert len(reads) == 12
    for a, b, c in zip(first, again, fresh, strict=True):
        for key in ("image", "cf_image", "target", "sampled"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])


def test_items_are_functions_of_step_and_position_not_of_order_or_workers(tiny_data):
    params = tiny_train_params(batch_size=4, num_sampled=5)
    items, _ = _items(tiny_data, params)
    forward = [items[i] for i in range(12)]
    backward = [items[i] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["sampled"], b["sampled"]) and torch.equal(a["target"], b["target"])
    # an epoch reads every sample once; the next epoch in another order
    ids = [it["id"] for it in forward]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12
    nxt = [items[i]["id"] for i in range(12, 24)]
    assert sorted(nxt) == sorted(ids) and nxt != ids
    # DataLoader workers give the same batches as the training process itself
    batches = StepBatches(1, 3, 4, 0, 1)
    a = list(loader(items, batches, 0, False))
    b = list(loader(items, batches, 2, False))
    for x, y in zip(a, b, strict=True):
        assert x["id"] == y["id"] and torch.equal(x["image"], y["image"])
        assert torch.equal(x["target"], y["target"])
    # two processes' slices of a step are the one-process batch
    halves = [list(loader(items, StepBatches(1, 2, 4, r, 2), 0, False))[0] for r in (0, 1)]
    assert halves[0]["id"] + halves[1]["id"] == a[0]["id"]


def test_augmentation_crops_pads_with_ignore_and_is_seeded(tiny_data):
    params = tiny_train_params(batch_size=4, crop=24, photometric=True)
    items, _ = _items(tiny_data, params)
    out = [items[i] for i in range(8)]
    for it in out:
        assert it["image"].shape == (3, 24, 24) and it["target"].shape == (24, 24)
        assert 0.0 <= it["image"].min() and it["image"].max() <= 1.0
    assert any((it["target"] == IGNORE).any() for it in out)  # scales < 0.75 pad
    assert torch.equal(items[5]["image"], out[5]["image"])  # the same draws again
    with pytest.raises(ConfigError, match="scale_range"):
        from magicseg.core.config import parse_params

        parse_params({"train": {"scale_range": [0.5, 1.0]}})


def test_cf_rows_spread_over_the_batch():
    assert cf_rows(8, 1.0).all()
    assert cf_rows(8, 0.5).tolist() == [False, True] * 4
    assert cf_rows(8, 0.25).sum() == 2 and cf_rows(16, 0.25).reshape(2, -1).sum(1).tolist() == [
        2,
        2,
    ]


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
        loss, parts = model.compute_loss(batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        if cf_loss != "none":
            assert parts["cf_loss"] >= 0.0
    assert losses[-1] < 0.8 * losses[0], losses


def test_cf_fraction_passes_only_the_chosen_counterfactuals(tiny_data, tiny_encoder):
    params = tiny_train_params(batch_size=8, cf_fraction=0.5)
    batch = _batch(tiny_data, tiny_encoder, params)
    assert batch.cf_rows.tolist() == [False, True] * 4
    torch.manual_seed(0)
    model = build_model("offline", model_config(params), tiny_encoder.dim)
    seen = []
    real = model.forward
    model.forward = lambda images, feats: (seen.append(images.shape[0]), real(images, feats))[1]
    _, parts = model.compute_loss(batch, params)
    assert seen == [12] and parts["cf_loss"] > 0  # 8 positives + 4 counterfactuals


def test_schedule_warmup_cosine_and_poly():
    p = TrainParams(steps=1000, warmup="5%", warmup_ratio=0.02, min_lr_ratio=0.05)
    f = lr_factor(p)
    assert p.warmup_steps() == 50
    assert f(0) == pytest.approx(0.02) and f(25) == pytest.approx(0.51)
    assert f(50) == pytest.approx(1.0) and f(999) == pytest.approx(0.05, abs=1e-4)
    assert f(525) == pytest.approx(0.05 + 0.95 * 0.5)
    q = TrainParams(steps=100, schedule="poly", warmup=10, warmup_ratio=1e-6, min_lr_ratio=0.0)
    g = lr_factor(q)
    assert g(0) == pytest.approx(1e-6) and g(10) == pytest.approx(0.9**0.9)
    assert g(5) == pytest.approx((0.95**0.9) * (1e-6 + (1 - 1e-6) * 0.5))
    assert g(100) == 0.0
    assert TrainParams(steps=10, warmup=0).warmup_steps() == 0
    assert TrainParams(steps=10, warmup="5%").warmup_steps() == 1
    with pytest.raises(ConfigError, match="train.warmup"):
        from magicseg.core.config import parse_params

        parse_params({"train": {"warmup": "five"}})


def test_weight_decay_rule(tiny_encoder):
    params = tiny_train_params()
    model = build_model("offline", model_config(params), tiny_encoder.dim)
    one = make_optimizer(model, params)
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 1e-4
    two = make_optimizer(model, tiny_train_params(weight_decay_rule="matrices", lr_multiplier=10))
    decayed, plain = two.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and plain["weight_decay"] == 0.0
    assert all(p.dim() < 2 for p in plain["params"]) and decayed["lr"] == pytest.approx(3e-2)


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


def test_train_writes_checkpoint_curves_and_the_same_bytes_every_run(
    tmp_path, tiny_data, tiny_encoder
):
    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_train_params(cf_weight=0.1, cf_loss="hinge_head")
    m1 = train(
        filter_dir, vocab_dir, params, 0, tmp_path / "a", tmp_path / "la", None, tiny_encoder
    )
    m2 = train(
        filter_dir, vocab_dir, params, 0, tmp_path / "b", tmp_path / "lb", None, tiny_encoder
    )
    assert m1["steps"] == 3 and m1["samples_train"] + m1["samples_val"] == 12
    assert m1["samples_val"] > 0 and 0.0 <= m1["val_miou"] <= 1.0
    assert "seconds" not in m1 and m1 == m2
    # same params, data and threads: the same model.pt bytes, the same curves
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    for f in (tmp_path / "la").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "lb" / f.relative_to(tmp_path / "la")).read_bytes()
    s1 = torch.load(tmp_path / "a/model.pt", weights_only=True)
    assert s1["vocab"] == list(vocab.names) and s1["holdout"] == sorted(vocab.holdout)
    assert s1["config"] == {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    assert s1["image_size"] == [32, 32] and "seconds" not in json.dumps(s1["meta"])
    # dvclive curves, and no dvc.yaml written anywhere
    loss_tsv = (tmp_path / "la/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_tsv[0].split("\t") == ["step", "loss"] and len(loss_tsv) == 4
    assert (tmp_path / "la/plots/metrics/val/miou.tsv").is_file()
    assert (tmp_path / "la/plots/metrics/train/lr.tsv").is_file()
    assert not list(tmp_path.rglob("dvc.yaml"))
    # another seed trains differently
    m3 = train(filter_dir, vocab_dir, params, 1, tmp_path / "c", None, None, tiny_encoder)
    assert m3["loss"] != m1["loss"]


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(steps=6, checkpoint_every=2, log_every=2, val_every=3)
    full: list[float] = []
    state = tmp_path / "state"
    train(filter_dir, vocab_dir, params, 0, tmp_path / "a", tmp_path / "la", None, tiny_encoder,
          history=full)  # fmt: skip
    part: list[float] = []
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", tmp_path / "lb", state, tiny_encoder,
          stop_at=3, history=part)  # fmt: skip
    (key,) = list(state.iterdir())
    assert torch.load(key / STATE, weights_only=False)["step"] == 3
    assert not (tmp_path / "b/model.pt").exists() and len(part) == 3
    rest: list[float] = []
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", tmp_path / "lb", state, tiny_encoder,
          history=rest)  # fmt: skip
    assert part + rest == full
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    for name in ("train/loss.tsv", "val/miou.tsv"):
        a = (tmp_path / "la/plots/metrics" / name).read_text()
        assert a == (tmp_path / "lb/plots/metrics" / name).read_text()
    timing = json.loads((key / TIMING).read_text())
    assert timing["steps_run"] == 3 and 0 <= timing["validation_share"] < 1
    # other params: another run key, a fresh start
    train(filter_dir, vocab_dir, params.model_copy(update={"lr": 1e-3}), 0, tmp_path / "c", None,
          state, tiny_encoder)  # fmt: skip
    assert len(list(state.iterdir())) == 2


def test_validation_scores_a_fixed_subset_against_sampled_classes(
    tmp_path, tiny_data, tiny_encoder
):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(val_fraction=0.5, val_samples=2, val_num_sampled=4, steps=2)
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, tiny_encoder)
    assert m["samples_val"] > 2 and m["val_samples"] == 2 and 0.0 <= m["val_miou"] <= 1.0


def test_num_sampled_above_the_trainable_classes_warns_once(
    tmp_path, tiny_data, tiny_encoder, capsys
):
    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_train_params(num_sampled=500, steps=1)
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, tiny_encoder)
    n = len(vocab.trainable)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"warning: train.num_sampled: 500 exceeds the {n} trainable classes; using {n}" in err
    assert m["num_sampled_effective"] == n


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
        read_index(tmp_path, vocab)


def test_images_of_two_sizes_without_a_crop_are_a_data_error(tiny_data):
    params = tiny_train_params(batch_size=2)
    items, _ = _items(tiny_data, params)
    a, b = items[0], items[1]
    b["image"] = torch.zeros(3, 16, 16)
    with pytest.raises(DataError, match="train.crop"):
        collate([a, b])


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
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, tiny_encoder)
    assert m["samples_val"] == 0 and m["samples_train"] == 12
    assert m["val_miou"] is None and m["num_params"] > 0


def test_only_the_passed_counterfactuals_are_read(tiny_data):
    """cf_fraction 0.5: the rows whose counterfactual the loss sees carry it, read from disk
    (flipped with its positive); the others carry zeros, and their files are never opened."""
    _, filter_dir, vocab = tiny_data
    index = read_index(filter_dir, vocab)
    params = tiny_train_params(cf_fraction=0.5)
    items = TrainItems(index, BatchPlan(len(index), 4, 0), vocab.trainable, 5, params, 0)
    opened: list[int] = []
    real = index.read

    class Spy:
        def __getattr__(self, name):
            return getattr(index, name)

        def read(self, i, counterfactual=True):
            if counterfactual:
                opened.append(i)
            return real(i, counterfactual)

    items.index = Spy()
    rows = [items[j] for j in range(4)]
    passed = [bool(x) for x in cf_rows(4, 0.5)]
    assert [r["cf_row"] for r in rows] == passed and sum(passed) == 2
    for j, r in enumerate(rows):
        s = items.plan.sample(j)
        if r["cf_row"]:
            cf = torch.from_numpy(index.read(s)[1].copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(r["cf_image"], cf) or torch.equal(r["cf_image"], cf.flip(-1))
        else:
            assert not r["cf_image"].any()
    assert opened == [items.plan.sample(j) for j in range(4) if passed[j]]


def test_streamed_items_match_the_files(tiny_data):
    _, filter_dir, vocab = tiny_data
    index = read_index(filter_dir, vocab)
    image, cf, mask = index.read(3)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and mask.dtype == np.int64
    assert index.ids[3] == read_manifest(filter_dir)["id"][3]


@pytest.mark.parametrize(
    "over",
    [
        {"cf_loss": "hinge_head"},
        {"cf_loss": "cf_background", "precision": "bf16", "cf_fraction": 0.5},  # default levers
    ],
)
def test_two_cpu_processes_match_one_for_the_offline_model(
    tmp_path, tiny_data, tiny_encoder, tiny_text_dir, over
):
    """torch.distributed.run, 2 gloo processes x 2 images = 1 process x 4 images: the same
    losses and the same model (BatchNorm statistics over both processes' images)."""
    from tests.clip_helpers import train_two_processes

    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_train_params(steps=3, cf_weight=0.5, logger="none", **over)
    one: list[float] = []
    m1 = train(filter_dir, vocab_dir, params, 0, tmp_path / "one", None, None, tiny_encoder,
               history=one)  # fmt: skip
    two = train_two_processes(filter_dir, vocab_dir, tmp_path, params, tiny_text_dir)
    assert two["metrics"]["processes"] == 2
    # fp32: to float rounding; bf16 (8-bit mantissa: relative rounding 2**-8 = 0.4%) rounds each
    # process's half of the batch on its own, and the optimiser turns those last-bit
    # differences into small weight differences (measured: up to 0.2% on the third loss)
    bf16 = params.precision == "bf16"
    np.testing.assert_allclose(two["history"], one, rtol=5e-3 if bf16 else 1e-5)
    a = torch.load(tmp_path / "one/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two/model.pt", weights_only=True)["state_dict"]
    tol = {"rtol": 1e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-4, "atol": 1e-5}
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **tol, msg=k)
    # validation: each process scores its shard, the confusion matrices are summed
    assert two["metrics"]["val_pixel_acc"] == pytest.approx(m1["val_pixel_acc"], abs=1e-3)
