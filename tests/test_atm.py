"""The published ZegCLIP ATM decoder (``train.clip.decoder: atm``) and the published VPT forward
(``train.clip.vpt_style: zegclip``) on a tiny random CLIP loaded through the real path: shapes,
masks = the cross-attention logits, the relationship descriptor, SegLossPlus against a literal
hand computation of the published criterion, what trains, the real training loop, checkpoints,
sliding-window prediction."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.clip_helpers import first_batch, tiny_clip_params

from magicseg.core.errors import ConfigError
from magicseg.inference import predict
from magicseg.model import build_model, load_checkpoint
from magicseg.model.atm import seg_loss_plus
from magicseg.model.losses import IGNORE
from magicseg.training.loop import model_config, train

ATM = {"decoder": "atm", "deep_supervision": False, "loss_stride": 1}


def test_zegclip_prompt_dropout_draws_one_mask_per_image(clip_dir, clip_text):
    """The published encoder expands the projected prompts over the batch, then drops out:
    each image its own mask (not one mask shared by the batch, positives and counterfactuals
    alike)."""
    zeg, _ = _model(clip_dir, clip_text.dim, vpt_style="zegclip")
    zeg.train()
    torch.manual_seed(1)
    prompts = zeg.encoder._prompts(0, 4, torch.float32)
    assert prompts.shape == (4, zeg.encoder.vpt_tokens, zeg.encoder.width)
    dropped = prompts == 0
    assert 0.02 < dropped.float().mean() < 0.3  # dropout 0.1
    assert not all(torch.equal(dropped[0], dropped[i]) for i in range(1, 4))
    # the same image twice in one batch: different masks, different embeddings
    image = torch.rand(1, 3, 32, 32)
    glob = zeg.embed_images(image.expand(2, -1, -1, -1))
    assert not torch.allclose(glob[0], glob[1])
    zeg.eval()
    with torch.no_grad():
        glob = zeg.embed_images(image.expand(2, -1, -1, -1))
    assert torch.allclose(glob[0], glob[1], atol=1e-6)


def _model(clip_dir, text_dim, **clip):
    params = tiny_clip_params(clip_dir, clip=ATM | clip)
    torch.manual_seed(0)
    return build_model("clip", model_config(params), text_dim), params


# --------------------------------------------------------------------------------------------
# the published criterion, written out literally (per image, per class, with Python loops)
# --------------------------------------------------------------------------------------------
def published_seg_loss_plus(masks, target, mask_weight=100.0, dice_weight=1.0):
    """SegPlusCriterion as published, on labels in its space: our class j (1..K) is its
    channel j - 1 and our background its ignore label 255 (reduce_zero_label)."""
    b, k, h, w = masks.shape
    label = torch.where(target > 0, target - 1, torch.full_like(target, 255))
    # prepare_targets: the classes present, one binary mask each
    labels = [torch.unique(label[i])[torch.unique(label[i]) != 255] for i in range(b)]
    num_masks = max(float(sum(len(x) for x in labels)), 1.0)
    # focal: a one-hot over all K channels (255 pixels: 0 everywhere), mean over pixels
    total_focal = 0.0
    for i in range(b):
        for c in range(k):
            x = masks[i, c].flatten().double()
            t = (label[i] == c).flatten().double()
            p = x.sigmoid()
            ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = 0.25 * t + 0.75 * (1 - t)
            total_focal += float((a_t * ce * (1 - p_t) ** 2).mean())
    # dice on the present classes only
    total_dice = 0.0
    for i in range(b):
        for c in labels[i].tolist():
            p = masks[i, c].flatten().double().sigmoid()
            t = (label[i] == c).flatten().double()
            total_dice += float(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    return mask_weight * total_focal / num_masks + dice_weight * total_dice / num_masks


def test_seg_loss_plus_equals_the_published_criterion():
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(3, 4, 6, 5, generator=g) * 3
    target = torch.randint(0, 5, (3, 6, 5), generator=g)
    target[1] = 0  # an image with no class: negatives only, no dice term, no mask counted
    target[2] = torch.where(target[2] > 2, 3, 0)  # one class present
    want = published_seg_loss_plus(masks, target)
    got = seg_loss_plus(masks, target, 100.0, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # other weights, and the masks at a lower resolution than the target (bilinear upsampling)
    coarse = torch.randn(2, 3, 3, 3, generator=g)
    t2 = torch.randint(0, 4, (2, 9, 9), generator=g)
    up = F.interpolate(coarse, size=(9, 9), mode="bilinear", align_corners=False)
    want = published_seg_loss_plus(up, t2, 20.0, 2.0)
    assert seg_loss_plus(coarse, t2, 20.0, 2.0).item() == pytest.approx(want, rel=1e-5)


def test_seg_loss_plus_properties():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    good = F.one_hot(target, 3)[..., 1:].permute(0, 3, 1, 2).float() * 20 - 10
    assert seg_loss_plus(good, target, 100, 1) < 0.01 < 1.0 < seg_loss_plus(-good, target, 100, 1)
    # ignore pixels count for nothing, whatever the masks there
    t2 = target.clone()
    t2[:, :3] = IGNORE
    noisy = good.clone()
    noisy[:, :, :3] = torch.randn(2, 2, 3, 8, generator=g) * 10
    a = seg_loss_plus(good, t2, 100, 1)
    assert torch.allclose(a, seg_loss_plus(noisy, t2, 100, 1))
    assert not torch.allclose(
        seg_loss_plus(good, target, 100, 1), seg_loss_plus(noisy, target, 100, 1)
    )
    # background is a negative for every class: a mask firing on it costs focal loss
    fires = good.clone()
    fires[:, 0][target == 0] = 10.0
    assert seg_loss_plus(fires, target, 100, 0) > 10 * seg_loss_plus(good, target, 100, 0)
    # stride 2: the target nearest-downsampled, the masks resized to it
    small = F.interpolate(good, size=(4, 4), mode="bilinear", align_corners=False)
    t_small = target[:, ::2, ::2]
    assert torch.allclose(
        seg_loss_plus(good, target, 100, 1, 2), seg_loss_plus(small, t_small, 100, 1)
    )
    # a given number of masks replaces the count
    n = float((F.one_hot(target, 3)[..., 1:].sum(dim=(1, 2)) > 0).sum())
    assert torch.allclose(
        seg_loss_plus(-good, target, 100, 1, 1, 2 * n), seg_loss_plus(-good, target, 100, 1) / 2
    )


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def test_output_shapes_for_shared_and_per_image_classes_and_odd_sizes(clip_dir, clip_text):
    model, _ = _model(clip_dir, clip_text.dim, decoder_layers=3)
    model.eval()
    feats = clip_text.encode(["red ball", "blue box", "green kite"])
    with torch.no_grad():
        out = model(torch.rand(2, 3, 37, 45), feats)  # padded to 40x48: a 5x6 patch grid
        per_image = model(torch.rand(2, 3, 37, 45), torch.stack([feats, feats.flip(0)]))
    for o in (out, per_image):
        assert o.logits.shape == (2, 4, 37, 45)
        assert len(o.aux_logits) == 3 and all(a.shape == (2, 4, 5, 6) for a in o.aux_logits)
        assert torch.equal(o.logits[:, 0], torch.zeros(2, 37, 45))  # background: the boundary
        assert o.global_embedding.shape == (2, clip_text.dim)
        assert o.class_embeddings.shape == (2, 3, clip_text.dim)
    # one image, a single class
    with torch.no_grad():
        one = model(torch.rand(1, 3, 32, 32), feats[:1])
    assert one.logits.shape == (1, 2, 32, 32)


def test_masks_are_the_cross_attention_logits(clip_dir, clip_text):
    model, _ = _model(clip_dir, clip_text.dim)
    model.eval()
    seen = []

    def hook(module, args, output):
        x, memory = args
        seen.append((x, memory, output[1]))

    handles = [layer.cross_attn.register_forward_hook(hook) for layer in model.atm.layers]
    images = torch.rand(2, 3, 37, 45)
    feats = clip_text.encode(["red ball", "blue box", "green kite"])
    with torch.no_grad():
        out = model(images, feats)
    for h in handles:
        h.remove()
    assert len(seen) == 2
    for (_, _, logits), aux in zip(seen, out.aux_logits, strict=True):
        assert torch.equal(aux[:, 1:], logits.reshape(2, 3, 5, 6))  # every layer's masks
    # the last layer's logits, upsampled to the padded image and cropped, are the output
    last = seen[-1][2].reshape(2, 3, 5, 6)
    up = F.interpolate(last, size=(40, 48), mode="bilinear", align_corners=False)[..., :37, :45]
    assert torch.allclose(out.logits[:, 1:], up, atol=1e-6)
    # and the logits are the pre-softmax attention scores of that layer, mean over heads
    x, memory, logits = seen[-1]
    attn = model.atm.layers[-1].cross_attn
    heads, d = attn.heads, x.shape[-1]
    q = attn.q(x).view(2, 3, heads, d // heads).transpose(1, 2)
    k = attn.k(memory).view(2, -1, heads, d // heads).transpose(1, 2)
    by_hand = ((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5).mean(1)
    assert torch.allclose(logits, by_hand, atol=1e-6)
    # the memory is CLIP's projected patch embedding, L2-normalised (use_proj=False)
    with torch.no_grad():
        _, grid = model.encoder(F.pad(images, (0, 3, 0, 3), mode="replicate"))
        want = model.encoder.projection(grid.flatten(2).transpose(1, 2))
    assert torch.allclose(memory, F.normalize(want, dim=-1), atol=1e-6)


def test_queries_come_from_the_relationship_descriptor(clip_dir, clip_text):
    model, _ = _model(clip_dir, clip_text.dim)
    model.eval()
    got = []
    handle = model.atm.q_proj.register_forward_hook(lambda m, a, o: got.append(a[0]))
    images = torch.rand(2, 3, 32, 32)
    feats = clip_text.encode(["red ball", "blue box"])
    with torch.no_grad():
        model(images, feats)
        cls = F.normalize(model.embed_images(images), dim=-1)
    handle.remove()
    text = F.normalize(feats, dim=-1).unsqueeze(0).expand(2, -1, -1)
    want = torch.cat([cls.unsqueeze(1) * text, text], dim=-1)  # [cls * t, t]: Bx K x 2T
    assert got[0].shape == (2, 2, 2 * clip_text.dim)
    assert torch.allclose(got[0], want, atol=1e-6)
    # so the queries depend on the image: different images, different queries for one class
    assert not torch.allclose(got[0][0], got[0][1])


def test_gradients_reach_only_prompts_and_decoder(tiny_data, clip_text, clip_dir):
    for style in ("plain", "zegclip"):
        model, params = _model(clip_dir, clip_text.dim, vpt_style=style)
        batch = first_batch(tiny_data, clip_text, params)
        loss, parts = model.compute_loss(batch, params)
        loss.backward()
        assert parts["cf_loss"] > 0  # hinge_head on the CLS embeddings
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        vision = {n for n in trainable if n.startswith("encoder.")}
        extra = {"prompt_proj.weight", "prompt_proj.bias", "prompt_norm.weight", "prompt_norm.bias"}
        want = {"encoder.prompts"} | (
            {f"encoder.{n}" for n in extra} if style == "zegclip" else set()
        )
        assert vision == want
        assert trainable - vision == {
            n for n, _ in model.named_parameters() if n.startswith("atm.")
        }
        grads = {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert grads <= trainable
        assert (model.encoder.prompts.grad.abs().sum(dim=(1, 2)) > 0).all()  # every layer's
        assert {n for n in grads if n.startswith("atm.")} >= {
            "atm.q_proj.weight",
            "atm.layers.0.cross_attn.v.weight",
        }
        # the masks are the last layer's attention logits: its value path and FFN (as published)
        # never reach the output
        dead = [n for n, p in model.atm.layers[-1].named_parameters() if p.grad is not None]
        assert all(n.startswith(("cross_attn.q.", "cross_attn.k.")) for n in dead), dead


def test_zegclip_vpt_embeddings_and_prompt_dropout(clip_dir, clip_text):
    plain, _ = _model(clip_dir, clip_text.dim)
    zeg, _ = _model(clip_dir, clip_text.dim, vpt_style="zegclip")
    x = torch.rand(2, 3, 32, 32)
    x = (x - plain.encoder.mean) / plain.encoder.std
    emb = plain.encoder.vision.embeddings
    with torch.no_grad():
        hf = emb(x, interpolate_pos_encoding=True)
        ours = zeg.encoder._zegclip_embeddings(x)
        # at the pretrained grid (crop 32 = image size 32) no interpolation: patches as in HF,
        # the CLS token with the class embedding added a second time (as published)
        assert torch.allclose(ours[:, 1:], hf[:, 1:], atol=1e-6)
        assert torch.allclose(ours[:, 0] - hf[:, 0], emb.class_embedding.expand(2, -1), atol=1e-6)
        # other sizes: bilinear from the 4x4 grid to crop / patch, then to the image's grid
        y = torch.rand(1, 3, 48, 40)
        big = zeg.encoder._zegclip_embeddings(y)
        pos = emb.position_embedding.weight[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(6, 5), mode="bilinear", align_corners=False)
        patches = emb.patch_embedding(y).flatten(2).transpose(1, 2)
        assert torch.allclose(big[:, 1:], patches + pos.flatten(2).transpose(1, 2), atol=1e-6)
    # the prompts pass a trainable projection and dropout 0.1: two training passes differ,
    # evaluation is deterministic
    images = torch.rand(2, 3, 32, 32)
    zeg.train()
    a, b = zeg.embed_images(images), zeg.embed_images(images)
    assert not torch.allclose(a, b)
    zeg.eval()
    with torch.no_grad():
        assert torch.equal(zeg.embed_images(images), zeg.embed_images(images))


def test_imagenet_normalisation_is_kept_in_the_checkpoint_config(clip_dir, clip_text):
    clip_norm, _ = _model(clip_dir, clip_text.dim)
    imagenet, params = _model(clip_dir, clip_text.dim, image_norm="imagenet")
    assert model_config(params)["image_norm"] == "imagenet"
    mean, std = imagenet.encoder.mean.flatten().tolist(), imagenet.encoder.std.flatten().tolist()
    assert mean == pytest.approx([123.675 / 255, 116.28 / 255, 103.53 / 255])
    assert std == pytest.approx([58.395 / 255, 57.12 / 255, 57.375 / 255])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(clip_norm.embed_images(images), imagenet.embed_images(images))


def test_refused_configurations(tmp_path, clip_dir, clip_text):
    with pytest.raises(ConfigError, match="train.clip.decoder_dim: .* text dim 16"):
        _model(clip_dir, clip_text.dim, decoder_dim=32, decoder_heads=2)
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    config = {"checkpoint": str(tmp_path / "siglip"), "decoder_dim": 16, "decoder_heads": 2}
    with pytest.raises(ConfigError, match="train.clip.vpt_style: zegclip needs a CLIP"):
        build_model("clip", config | {"vpt_style": "zegclip"}, 16)
    with pytest.raises(ConfigError, match="vision tower gives 32-d, the text 16-d"):
        build_model("clip", config | {"decoder": "atm"}, 16)  # SigLIP: no projection


def test_model_loss_is_the_criterion_on_the_attention_masks(tiny_data, clip_text, clip_dir):
    model, params = _model(clip_dir, clip_text.dim, decoder_layers=3)
    params = tiny_clip_params(clip_dir, cf_weight=0.0, clip=ATM | {"decoder_layers": 3})
    model.eval()  # no dropout: the same masks in both passes
    batch = first_batch(tiny_data, clip_text, params)
    loss, parts = model.compute_loss(batch, params)
    with torch.no_grad():
        out = model(batch.images, batch.features)
    up = [
        F.interpolate(a[:, 1:], size=(32, 32), mode="bilinear", align_corners=False)
        for a in out.aux_logits
    ]
    assert loss.item() == pytest.approx(published_seg_loss_plus(up[-1], batch.target), rel=1e-4)
    # deep supervision: the same criterion summed over the layers
    model.deep_supervision = True
    loss, _ = model.compute_loss(batch, params)
    want = sum(published_seg_loss_plus(u, batch.target) for u in up)
    assert loss.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("cf_loss", ["hinge_head", "hinge_pixels", "cf_background", "text_margin"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data, clip_text, clip_dir, cf_loss):
    model, _ = _model(clip_dir, clip_text.dim)
    params = tiny_clip_params(clip_dir, batch_size=6, cf_loss=cf_loss, clip=ATM)
    batch = first_batch(tiny_data, clip_text, params)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss, parts = model.compute_loss(batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
        assert parts["cf_loss"] >= 0.0 and np.isfinite(parts["loss"])
    assert losses[-1] < 0.8 * losses[0], losses


def test_train_stage_checkpoint_and_sliding_prediction(tmp_path, tiny_data, clip_text, clip_dir):
    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_clip_params(clip_dir, steps=12, lr=2e-3, clip=ATM | {"vpt_style": "zegclip"})
    history: list[float] = []
    m2 = train(filter_dir, vocab_dir, params, 0, tmp_path / "stage", None, None, clip_text,
               history=history)  # fmt: skip
    assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
    assert m2["num_trained_params"] < m2["num_params"]
    assert m2["steps"] == 12 and 0.0 <= m2["val_miou"] <= 1.0
    # the checkpoint carries the decoder and rebuilds it: identical logits
    blob = torch.load(tmp_path / "stage/model.pt", weights_only=True)
    assert blob["config"]["decoder"] == "atm" and blob["config"]["vpt_style"] == "zegclip"
    ckpt = load_checkpoint(tmp_path / "stage/model.pt", text_encoder=clip_text)
    assert hasattr(ckpt.model, "atm") and not hasattr(ckpt.model, "pixel_proj")
    model, _ = _model(clip_dir, clip_text.dim, vpt_style="zegclip")
    model.load_state_dict(blob["state_dict"])
    images = torch.rand(2, 3, 32, 32)
    feats = clip_text.encode(list(vocab.names[:4]))
    with torch.no_grad():
        assert torch.equal(ckpt.model(images, feats).logits, model.eval()(images, feats).logits)
    # predict with sliding windows on an image larger than the window
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    names = list(vocab.names[:4])
    masks = predict([image], names, ckpt, window=32, stride=24, device="cpu")
    assert masks[0].shape == (50, 70) and masks[0].min() >= 0 and masks[0].max() <= 4
    # background wherever no class mask fires (every class logit below 0)
    from magicseg.inference import Predictor, SlidingPredictor

    runner = SlidingPredictor(Predictor(ckpt), None, 32, 24)
    runner.set_classes(names)
    logits = runner.logits([image])
    none_fires = (logits[0, 1:] < 0).all(0)
    assert torch.equal(torch.from_numpy(masks[0] == 0), none_fires)


def _ddp_worker(rank: int, world: int, port: str, masks, target, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    n = masks.shape[0] // world
    loss = seg_loss_plus(
        masks[rank * n : (rank + 1) * n], target[rank * n : (rank + 1) * n], 100, 1
    )
    Path(f"{out}.{rank}").write_text(repr(loss.item()))
    dist.destroy_process_group()


def test_number_of_masks_is_averaged_over_processes(tmp_path):
    """As published: each process divides by the mean number of masks over the processes, so
    the mean of 2 processes' losses (what DDP's gradient averaging sees) is 1 process's."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    masks = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 4, (4, 8, 8), generator=g)
    target[2:] = torch.where(target[2:] == 1, 1, 0)  # the second half has fewer masks
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = str(tmp_path / "loss")
    mp.spawn(_ddp_worker, args=(2, port, masks, target, out), nprocs=2, join=True)
    two = [float(Path(f"{out}.{r}").read_text()) for r in range(2)]
    full = seg_loss_plus(masks, target, 100, 1).item()
    assert np.mean(two) == pytest.approx(full, rel=1e-6)
    # per-process counts would not give it
    halves = [seg_loss_plus(masks[i : i + 2], target[i : i + 2], 100, 1).item() for i in (0, 2)]
    assert np.mean(halves) != pytest.approx(full, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_atm_fit_on_gpu_bf16(tmp_path, tiny_data, clip_text, clip_dir):
    vocab_dir, filter_dir, vocab = tiny_data
    clip = ATM | {"vpt_style": "zegclip"}
    params = tiny_clip_params(clip_dir, steps=3, device="cuda", clip=clip)
    history: list[float] = []
    m = train(filter_dir, vocab_dir, params, 0, tmp_path, None, None, clip_text, history=history)
    assert m["steps"] == 3 and all(np.isfinite(history))
    ckpt = load_checkpoint(tmp_path / "model.pt", text_encoder=clip_text)
    images = torch.rand(2, 3, 32, 32)
    feats = clip_text.encode(list(vocab.names[:4]))
    with torch.no_grad():
        cpu = ckpt.model(images, feats).logits
        gpu = ckpt.model.cuda()(images.cuda(), feats.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
