"""The clip segmenter: deep visual prompts on a frozen CLIP, CLIP text encoder with templates,
focal + dice with deep supervision, counterfactual loss, category sampling, the accelerate
loop (resume, 2 processes). A tiny random CLIP saved with save_pretrained and loaded back
through the real loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.clip_helpers import first_batch, tiny_clip_params, train_two_processes

from magicseg.core.errors import BackendError
from magicseg.model import build_model, build_text_encoder, load_checkpoint
from magicseg.model.clip import ZEGCLIP_TEMPLATES, clip_loss, focal_dice_loss
from magicseg.model.losses import IGNORE, hinge_cos
from magicseg.training.data import augment_item
from magicseg.training.loop import STATE, model_config, train

ROOT = Path(__file__).resolve().parents[1]


def _model(clip_dir, text_dim, **clip):
    params = tiny_clip_params(clip_dir, clip=clip)
    torch.manual_seed(0)
    return build_model("clip", model_config(params), text_dim), params


def test_prompt_tokens_are_the_only_trainable_vision_parameters(clip_dir, clip_text):
    model, _ = _model(clip_dir, clip_text.dim, vpt_tokens=3)
    vision = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert vision == {"prompts"}
    assert model.encoder.prompts.shape == (2, 3, 32)  # one set per layer (deep VPT)
    frozen = [p for n, p in model.encoder.named_parameters() if n != "prompts"]
    assert frozen and not any(p.requires_grad for p in frozen)
    out = model(torch.rand(2, 3, 32, 32), clip_text.encode(["red ball", "blue box"]))
    (out.logits.mean() + out.global_embedding.sum()).backward()
    # every layer's prompts get a gradient; frozen CLIP weights none
    assert (model.encoder.prompts.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert all(p.grad is None for p in frozen)


def test_forward_shapes_other_sizes_and_prompts_matter(clip_dir, clip_text):
    model, _ = _model(clip_dir, clip_text.dim)
    feats = clip_text.encode(["a", "b", "c"])
    # 48x40: position embeddings interpolated (trained at 32); 36 is padded to 40
    out = model(torch.rand(2, 3, 48, 36), feats)
    assert out.logits.shape == (2, 4, 48, 36)
    assert out.global_embedding.shape == (2, clip_text.dim)
    assert len(out.aux_logits) == 2 and out.aux_logits[0].shape == (2, 4, 6, 5)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model.embed_images(images).clone()
        model.encoder.prompts.add_(torch.randn_like(model.encoder.prompts))
        after = model.embed_images(images)
    assert not torch.allclose(before, after)


def test_text_encoder_averages_templates_and_caches(clip_dir):
    enc = build_text_encoder("clip", {"checkpoint": str(clip_dir)})  # zegclip15
    assert len(enc.templates) == 15 and "There is a {} in the scene." in ZEGCLIP_TEMPLATES
    got = enc.encode(["cat", "red ball"])
    each = enc._embed([t.format("cat") for t in ZEGCLIP_TEMPLATES])
    want = F.normalize(each.mean(0), dim=0)
    assert torch.allclose(got[0], want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)
    single = build_text_encoder("clip", {"checkpoint": str(clip_dir), "templates": "single"})
    assert not torch.allclose(single.encode(["cat"])[0], got[0])
    enc._embed = None  # cached: a second call must not embed again
    assert torch.equal(enc.encode(["red ball"])[0], got[1])
    assert enc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert got.device.type == "cpu" and got.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_encoder_runs_on_the_gpu_and_matches_the_cpu(clip_dir):
    from magicseg.model.clip import ClipTextEncoder

    gpu = ClipTextEncoder(str(clip_dir))
    cpu = ClipTextEncoder(str(clip_dir), device="cpu")
    assert next(gpu.model.parameters()).is_cuda and not next(cpu.model.parameters()).is_cuda
    a, b = gpu.encode(["cat", "red ball"]), cpu.encode(["cat", "red ball"])
    assert a.device.type == "cpu"
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_missing_model_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError, match="train.clip.checkpoint"):
        build_text_encoder("clip", {"checkpoint": str(tmp_path / "nope")})


def test_sampled_classes_contain_own_and_no_duplicates(tiny_data, clip_text, clip_dir):
    params = tiny_clip_params(clip_dir, batch_size=8, num_sampled=6)
    feats = clip_text.encode(list(tiny_data[2].names))
    for step in range(5):
        batch = first_batch(tiny_data, clip_text, params, step=step)
        assert batch.features.shape == (8, 6, clip_text.dim)
        for row, own in zip(batch.features, batch.own, strict=True):
            ids = [int((feats - f).abs().sum(1).argmin()) + 1 for f in row]
            assert len(set(ids)) == 6  # no duplicates
            assert own[: int(own.sum())].all()  # own classes first
        # every image's own classes are sampled: its foreground is never ignored
        fg = batch.target[batch.target > 0]
        assert fg.numel() > 0


def test_focal_dice_loss_properties():
    # logits at 1/4 of the target resolution, as the loss compares them (LOSS_STRIDE)
    coarse = torch.randint(0, 3, (2, 4, 4))
    target = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    good = F.one_hot(coarse, 3).permute(0, 3, 1, 2).float() * 20 - 10
    lo = focal_dice_loss(good, target, 100.0, 1.0)
    hi = focal_dice_loss(-good, target, 100.0, 1.0)
    assert lo < 0.05 < 1.0 < hi
    # ignore pixels do not count, whatever the logits there
    t2 = target.clone()
    t2[:, :8] = IGNORE
    noisy = good.clone()
    noisy[:, :, :2] = torch.randn_like(noisy[:, :, :2]) * 10
    a = focal_dice_loss(good, t2, 100.0, 1.0)
    assert torch.allclose(a, focal_dice_loss(noisy, t2, 100.0, 1.0))
    assert not torch.allclose(lo, focal_dice_loss(noisy, target, 100.0, 1.0))
    # a batch's loss is the mean of its halves' (exact DDP averaging)
    x = torch.randn(4, 3, 16, 16)
    t = torch.randint(0, 3, (4, 16, 16))
    halves = (focal_dice_loss(x[:2], t[:2], 100, 1) + focal_dice_loss(x[2:], t[2:], 100, 1)) / 2
    assert torch.allclose(focal_dice_loss(x, t, 100, 1), halves, atol=1e-6)


def test_counterfactual_loss_zero_orthogonal_positive_aligned(tiny_data, clip_text, clip_dir):
    a = torch.tensor([[1.0, 0.0, 0.0]])
    assert hinge_cos(a, torch.tensor([[0.0, 1.0, 0.0]])).item() == 0.0
    assert hinge_cos(a, 2 * a).item() == pytest.approx(1.0)
    model, params = _model(clip_dir, clip_text.dim)
    batch = first_batch(tiny_data, clip_text, params)
    batch.cf_images = batch.images.clone()  # identical CLS embeddings: aligned
    _, parts = clip_loss(model, batch, params)
    assert parts["cf_loss"] == pytest.approx(1.0, abs=1e-5)
    # orthogonal global (CLS) embeddings of each pair: zero loss
    real = model.encoder.forward
    b = batch.images.shape[0]

    def orthogonal(images):
        glob, grid = real(images)
        glob = torch.zeros_like(glob)
        glob[:b, 0], glob[b:, 1] = 1.0, 1.0
        return glob, grid

    model.encoder.forward = orthogonal
    _, parts = clip_loss(model, batch, params)
    assert parts["cf_loss"] == 0.0


@pytest.mark.parametrize(
    "cf_loss", ["none", "hinge_head", "hinge_pixels", "cf_background", "text_margin"]
)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data, clip_text, clip_dir, cf_loss):
    model, _ = _model(clip_dir, clip_text.dim)
    over = {"cf_weight": 0.0} if cf_loss == "none" else {"cf_loss": cf_loss}
    params = tiny_clip_params(clip_dir, batch_size=6, **over)
    batch = first_batch(tiny_data, clip_text, params)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss, parts = model.compute_loss(batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        assert parts["cf_loss"] >= 0.0
    assert losses[-1] < 0.8 * losses[0], losses


def test_augment_same_geometry_and_colours_for_the_pair():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 20, 20)
    target = torch.randint(0, 3, (20, 20))
    outs = [augment_item(img, img.clone(), target, 24, (0.5, 2.0), True, g) for _ in range(6)]
    for a, cf, t in outs:
        assert a.shape == (3, 24, 24) and t.shape == (24, 24)
        assert torch.equal(a, cf)  # same geometry and colours for the pair
        assert set(t.unique().tolist()) <= {IGNORE, 0, 1, 2}
        assert 0.0 <= a.min() and a.max() <= 1.0
    assert any((t == IGNORE).any() for _, _, t in outs)  # scale < 1.2 pads with ignore
    again = augment_item(
        img, img.clone(), target, 24, (0.5, 2.0), True, torch.Generator().manual_seed(0)
    )
    assert torch.equal(again[0], outs[0][0])


def test_resume_continues_identically_and_checkpoint_carries_config(
    tmp_path, tiny_data, clip_text, clip_dir
):
    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_clip_params(clip_dir, steps=5, checkpoint_every=1)
    full: list[float] = []
    m = train(filter_dir, vocab_dir, params, 0, tmp_path / "a", text_encoder=clip_text,
              history=full)  # fmt: skip
    parts: list[float] = []
    state = tmp_path / "state"
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state, clip_text, stop_at=2,
          history=parts)  # fmt: skip
    assert len(parts) == 2 and not (tmp_path / "b/model.pt").exists()
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state, clip_text, history=parts)
    assert parts == full and len(full) == 5
    assert full[-1] < full[0] and m["num_trained_params"] < m["num_params"]
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    a = torch.load(tmp_path / "a/model.pt", weights_only=True)
    # the checkpoint carries its model config and rebuilds through the real loading path
    assert a["model"] == "clip" and a["config"]["checkpoint"] == str(clip_dir)
    assert a["config"]["resolution"] == 32 and a["image_size"] == [32, 32]  # train.crop
    ckpt = load_checkpoint(tmp_path / "a/model.pt", text_encoder=clip_text)
    images = torch.rand(1, 3, 32, 32)
    feats = clip_text.encode(list(vocab.names[:3]))
    model, _ = _model(clip_dir, clip_text.dim)
    model.load_state_dict(a["state_dict"])
    with torch.no_grad():
        assert torch.equal(ckpt.model(images, feats).logits, model.eval()(images, feats).logits)


def test_train_stage_with_model_clip(tmp_path, tiny_data, clip_text, clip_dir):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_clip_params(clip_dir, steps=2, cf_loss="cf_background")
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, clip_text)
    assert m["steps"] == 2 and m["processes"] == 1 and 0.0 <= m["val_miou"] <= 1.0
    assert m["cf_loss"] > 0 and (tmp_path / "model.pt").is_file()


def test_two_cpu_processes_match_one(tmp_path, tiny_data, clip_text, clip_dir):
    """torch.distributed.run, 2 gloo processes x 2 images = 1 process x 4 images."""
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_clip_params(clip_dir, steps=3, clip={"templates": "single"})
    one: list[float] = []
    train(filter_dir, vocab_dir, params, 0, tmp_path / "one", None, None, clip_text, history=one)
    two = train_two_processes(filter_dir, vocab_dir, tmp_path, params, timeout=120)
    assert two["metrics"]["processes"] == 2
    np.testing.assert_allclose(two["history"], one, rtol=1e-5)
    a = torch.load(tmp_path / "one/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two/model.pt", weights_only=True)["state_dict"]
    d = 16  # decoder_dim
    for k in a:
        x, y = a[k].clone(), b[k].clone()
        if k.endswith("in_proj_bias"):
            # the attention key bias has a zero true gradient (softmax ignores it): Adam turns
            # its rounding noise into lr-sized steps that differ with the reduction order
            x[d : 2 * d], y[d : 2 * d] = 0, 0
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_gpu_bf16(tmp_path, tiny_data, clip_text, clip_dir):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_clip_params(clip_dir, steps=3, device="cuda")
    history: list[float] = []
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, clip_text, history=history)
    assert m["steps"] == 3 and all(np.isfinite(history))
    assert (tmp_path / "model.pt").is_file()


def test_siglip_vision_tower_by_directory(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    config = {"checkpoint": str(tmp_path / "siglip"), "decoder_dim": 16, "decoder_heads": 2}
    model = build_model("clip", config | {"vpt_tokens": 2}, 8)
    assert {n for n, p in model.encoder.named_parameters() if p.requires_grad} == {"prompts"}
    assert not model.encoder.has_cls
    out = model(torch.rand(2, 3, 48, 32), torch.randn(3, 8))
    assert out.logits.shape == (2, 4, 48, 32) and out.global_embedding.shape == (2, 32)


class _Crash(list):
    """A history list that raises on its ``n``-th append (a run killed mid-way)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def append(self, x) -> None:
        if len(self) + 1 == self.n:
            raise KeyboardInterrupt
        super().append(x)


def test_killed_run_resumes_from_the_periodic_state(tmp_path, tiny_data, clip_text, clip_dir):
    vocab_dir, filter_dir, _ = tiny_data
    params = tiny_clip_params(clip_dir, steps=5, checkpoint_every=2)
    full: list[float] = []
    train(filter_dir, vocab_dir, params, 0, tmp_path / "a", None, None, clip_text, history=full)
    crash = _Crash(4)  # dies in step 4, after the state of step 2
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state, clip_text,
              history=crash)  # fmt: skip
    (key,) = list(state.iterdir())
    assert torch.load(key / STATE, weights_only=False)["step"] == 2
    rest: list[float] = []
    train(filter_dir, vocab_dir, params, 0, tmp_path / "b", None, state, clip_text, history=rest)
    assert crash == full[:3] and rest == full[2:]
