"""The miniature CLIP (corpus, image tower, pretraining and its kept checkpoint) and the
segmenter built on it (frozen backbone, what trains, the counterfactual losses' tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magicseg.core.catalogue import CATALOGUE
from magicseg.core.config import MiniZegModelParams, PretrainParams, TrainParams, parse_params
from magicseg.core.errors import ConfigError, DataError
from magicseg.miniclip import corpus as C
from magicseg.miniclip import pretrain as P
from magicseg.miniclip.model import ImageTower, load_tower, save_tower
from magicseg.model import build_model, load_checkpoint, save_checkpoint
from magicseg.model.base import Batch

TINY = {
    "images": 48,
    "test_images": 24,
    "size": 32,
    "stem_width": 4,
    "width": 16,
    "layers": 2,
    "heads": 2,
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
}


def _tower(dim: int = 32) -> ImageTower:
    torch.manual_seed(0)
    return ImageTower(4, 16, 2, 2, 2, dim, 32)


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------
def test_corpus_is_seeded_covers_every_class_and_captions_name_the_class():
    a = C.render_corpus(0, False, 300, 32, 0.3, 4)
    b = C.render_corpus(0, False, 300, 32, 0.3, 4)
    assert np.array_equal(a.images, b.images) and a.images.shape == (300, 32, 32, 3)
    assert set(a.classes) == set(range(len(CATALOGUE)))  # held-out classes included
    for i in (0, 7, 251, 299):
        assert CATALOGUE[a.classes[i]].name in a.caption(i)
    assert {a.contexts[i] for i in range(300)} > {C.BARE}  # varied captions
    assert a.masks is None  # training never sees where the object is
    other = C.render_corpus(1, False, 4, 32, 0.3, 4)
    test = C.render_corpus(0, True, 4, 32, 0.3, 4)
    assert not np.array_equal(other.images, a.images[:4])
    assert not np.array_equal(test.images, a.images[:4])
    assert test.masks.shape == (4, 32, 32) and test.masks.any(axis=(1, 2)).all()


def test_caption_table_is_context_major():
    texts = C.caption_texts()
    n = len(CATALOGUE)
    assert len(texts) == len(C.CONTEXTS) * n
    assert texts[C.BARE * n + 5] == CATALOGUE[5].name
    assert texts[1 * n + 5] == f"a photo of a {CATALOGUE[5].name}"


# --------------------------------------------------------------------------------------------
# the tower
# --------------------------------------------------------------------------------------------
def test_tower_shapes_prompts_and_no_batch_statistics():
    tower = _tower().eval()
    x = torch.rand(3, 3, 32, 32)
    out = tower(x)
    assert out.glob.shape == (3, 32) and out.tokens.shape == (3, 16, 8, 8)
    dense = tower.project(out.tokens)
    assert torch.allclose(dense.mean(dim=(2, 3)), out.glob, atol=1e-5)  # glob = mean dense
    alone = tower(x[:1]).glob
    assert torch.allclose(alone, out.glob[:1], atol=1e-5)  # GroupNorm/LayerNorm only
    prompts = torch.randn(2, 3, 16)
    assert not torch.allclose(tower(x, prompts).glob, out.glob)
    assert tower(torch.rand(1, 3, 48, 40)).tokens.shape == (1, 16, 12, 10)  # other sizes


def test_tower_checkpoint_round_trip(tmp_path):
    tower = _tower().eval()
    save_tower(tmp_path / "model.pt", tower, 12.5, {"text_encoder": "tiny"})
    back, blob = load_tower(tmp_path)  # the directory works
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back(x).glob, tower(x).glob)
    assert blob["logit_scale"] == 12.5 and blob["meta"] == {"text_encoder": "tiny"}
    with pytest.raises(DataError, match="no pretrained miniature CLIP"):
        load_tower(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# pretraining
# --------------------------------------------------------------------------------------------
def test_pretrain_params_are_checked():
    with pytest.raises(ConfigError, match="pretrain"):
        parse_params({"pretrain": {"size": 60}})
    with pytest.raises(ConfigError, match="pretrain.stepz"):
        parse_params({"pretrain": {"stepz": 3}})


def test_pretrain_writes_a_checkpoint_keeps_it_and_reports_the_split(
    tmp_path, tiny_encoder, monkeypatch
):
    params = PretrainParams(**{**TINY, "test_images": len(CATALOGUE)})
    names = [c.name for c in CATALOGUE]
    novel = [i for i, n in enumerate(names, 1) if "star" in n]
    holdout = {*novel, 1}
    kinds = {"combination": [1], "novel": novel}
    report = P.pretrain(params, tmp_path / "m", names, holdout, kinds, tiny_encoder, False)
    for key in ("top1", "top1_seen", "top1_heldout", "top1_heldout_novel", "final_loss",
                "dense_top1", "dense_top1_seen", "dense_top1_heldout_novel"):  # fmt: skip
        assert key in report, key
    assert 0.0 <= report["dense_top1"] <= 1.0
    assert 0.0 <= report["top1_heldout_novel"] <= 1.0 and report["steps"] == 3
    ckpt = tmp_path / "m" / "model.pt"
    before = ckpt.read_bytes()
    # 1. The same params and code: the checkpoint is kept, only the report is made again.
    monkeypatch.setattr(P, "train_tower", lambda *a, **k: pytest.fail("trained again"))
    again = P.pretrain(
        params, tmp_path / "m", names, {1}, {"combination": [1]}, tiny_encoder, False
    )
    assert ckpt.read_bytes() == before and again["top1"] == report["top1"]
    assert "top1_heldout_novel" not in again  # the split changed, not the tower
    # 2. Other params: trained again.
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        P.pretrain(
            params.model_copy(update={"steps": 4}), tmp_path / "m", names, holdout, kinds,
            tiny_encoder, False,
        )  # fmt: skip


class _FakeTower:
    """Tokens = a given dense map (project = identity): for dense_correct."""

    patch = 4

    def __init__(self, dense):
        self.dense = dense

    def __call__(self, images):
        from magicseg.miniclip.model import TowerOutput

        d = self.dense[: len(images)]
        return TowerOutput(d.mean(dim=(2, 3)), d)

    def project(self, tokens):
        return tokens


def test_dense_score_counts_object_positions_classified_alone():
    size, n = 32, 2
    masks = np.zeros((n, size, size), bool)
    masks[:, :16, :16] = True  # the top-left 4x4 cells of the 8x8 grid
    test = C.Corpus(np.zeros((n, size, size, 3), np.uint8), np.array([0, 1]), np.zeros(2, int),
                    masks)  # fmt: skip
    text = torch.eye(3)
    dense = torch.zeros(n, 3, 8, 8)
    dense[:, 2] = 1.0  # every position says class 2 ...
    dense[0, :, :4, :4] = text[0, :, None, None]  # ... but image 0's object says its class 0
    dense[1, :, :2, :4] = text[1, :, None, None]  # half of image 1's object says class 1
    got = P.dense_correct(_FakeTower(dense), test, text)
    assert got.tolist() == [1.0, 0.5]


def test_dense_weight_changes_the_objective(tiny_encoder):
    corpus = C.render_corpus(0, False, 8, 32, 0.3, 4)
    table = tiny_encoder.encode(C.caption_texts()).view(len(C.CONTEXTS), len(CATALOGUE), -1)
    params = PretrainParams(**{**TINY, "images": 8, "steps": 2})
    losses = [
        P.train_tower(params.model_copy(update={"dense_weight": w}), corpus, table, False)[2]
        for w in (0.0, 1.0)
    ]
    assert losses[1][-1]["loss"] > losses[0][-1]["loss"]  # the dense term adds a loss


def test_pretraining_learns_a_fixed_batch(tiny_encoder, monkeypatch):
    """A few steps on a few images lower the loss (the image tower learns the text)."""
    monkeypatch.setattr(P, "RECORD_EVERY", 5)
    params = PretrainParams(
        **{**TINY, "images": 8, "batch_size": 8, "steps": 40, "lr": 3e-3, "logit_scale": 100}
    )
    corpus = C.render_corpus(0, False, 8, 32, 0.3, 4)
    table = tiny_encoder.encode(C.caption_texts()).view(len(C.CONTEXTS), len(CATALOGUE), -1)
    _, _, records = P.train_tower(params, corpus, table, progress=False)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


# --------------------------------------------------------------------------------------------
# the segmenter on it
# --------------------------------------------------------------------------------------------
@pytest.fixture
def backbone(tmp_path):
    path = tmp_path / "miniclip"
    path.mkdir()
    save_tower(path / "model.pt", _tower(), 10.0, {"text_encoder": "tiny"})
    return path


def _cfg(backbone, **kw) -> dict:
    return MiniZegModelParams(backbone=str(backbone), text_encoder="tiny", **kw).model_dump()


def _batch(b: int = 4, k: int = 3, dim: int = 32) -> Batch:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, k + 1, (b, 32, 32), generator=g)
    return Batch(
        torch.rand(b, 3, 32, 32, generator=g),
        torch.rand(b, 3, 32, 32, generator=g),
        torch.nn.functional.normalize(torch.randn(b, k, dim, generator=g), dim=-1),
        target,
        torch.zeros(b, k, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
    )


@pytest.mark.parametrize("cf_loss", ["hinge_head", "cf_background", "hinge_pixels", "text_margin"])
def test_frozen_backbone_gets_no_gradient_prompts_and_decoder_do(backbone, cf_loss):
    torch.manual_seed(0)
    model = build_model("minizeg", _cfg(backbone), 32).train()
    params = TrainParams(cf_weight=1.0, cf_loss=cf_loss)
    loss, part = model.compute_loss(_batch(), params)
    loss.backward()
    assert part["cf_loss"] >= 0 and part["pixel_loss"] > 0
    tower = dict(model.tower.named_parameters())
    assert all(not p.requires_grad and p.grad is None for p in tower.values())
    assert model.prompts.grad is not None and model.prompts.grad.abs().sum() > 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("tower.") for n in trained)
    assert {"prompts", "background", "logit_scale"} <= trained
    assert any(n.startswith("residual.") for n in trained)
    assert any(n.startswith("layers.") for n in trained)


def test_at_start_the_pixels_are_scored_by_the_pretrained_alignment(backbone):
    """Zero-initialised residual head and query correction: the class logits are the frozen
    projection's cosine to the text, as the pretrained tower scores them."""
    model = build_model("minizeg", _cfg(backbone, vpt_tokens=0), 32).eval()
    x, text = torch.rand(2, 3, 32, 32), torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    logits = model(x, text).logits
    tower, _ = load_tower(backbone)
    dense = torch.nn.functional.normalize(tower.project(tower(x).tokens), dim=1)
    want = torch.einsum("behw,ke->bkhw", dense, text) * 10.0
    want = torch.nn.functional.interpolate(want, size=(32, 32), mode="bilinear")
    assert torch.allclose(logits[:, 1:], want, atol=1e-4)


def test_hinge_head_is_on_the_global_embedding_of_one_pass(backbone, monkeypatch):
    """Positives and counterfactuals pass the tower in one batch; the hinge is on the tower's
    global embeddings of that pass."""
    torch.manual_seed(0)
    model = build_model("minizeg", _cfg(backbone), 32).train()
    sizes = []
    real = model.tower.encode_tokens
    monkeypatch.setattr(
        model.tower, "encode_tokens", lambda f, x, p=None: sizes.append(len(x)) or real(f, x, p)
    )
    batch = _batch()
    _, part = model.compute_loss(batch, TrainParams(cf_weight=1.0, cf_loss="hinge_head"))
    assert sizes == [8]
    with torch.no_grad():
        g_pos, g_cf = model.embed_images(batch.images), model.embed_images(batch.cf_images)
    want = torch.nn.functional.cosine_similarity(g_pos, g_cf).clamp_min(0).mean()
    assert part["cf_loss"] == pytest.approx(float(want), rel=1e-4)


def test_checkpoint_round_trip_and_wrong_text_encoder(backbone, tmp_path, tiny_encoder):
    torch.manual_seed(0)
    cfg = _cfg(backbone)
    model = build_model("minizeg", cfg, 32).eval()
    with torch.no_grad():
        model.residual[2].weight.normal_()  # a trained-looking head
    save_checkpoint(tmp_path / "s.pt", model, "minizeg", cfg, "tiny", ["a", "b"], [2], (32, 32))
    ckpt = load_checkpoint(tmp_path / "s.pt", text_encoder=tiny_encoder)
    x, feats = torch.rand(1, 3, 32, 32), torch.randn(2, 32)
    assert torch.equal(ckpt.model(x, feats).logits, model(x, feats).logits)
    with pytest.raises(ConfigError, match="pretrained against the text encoder 'tiny'"):
        build_model("minizeg", {**cfg, "text_encoder": "minilm"}, 32)
    with pytest.raises(ConfigError, match="384"):
        build_model("minizeg", cfg, 384)


def test_the_training_loop_trains_minizeg_and_evaluate_loads_it(
    backbone, tmp_path, tiny_data, tiny_encoder
):
    from tests.conftest import tiny_train_params

    from magicseg.core.seeding import derive_seed
    from magicseg.training.loop import model_config, train

    vocab_dir, filter_dir, vocab = tiny_data
    params = tiny_train_params(
        architecture="minizeg",
        cf_loss="hinge_head",
        minizeg={"backbone": str(backbone), "text_encoder": "tiny", "decoder_dim": 16},
    )
    before = {k: v.clone() for k, v in load_tower(backbone)[0].state_dict().items()}
    metrics = train(filter_dir, vocab_dir, params, 0, tmp_path / "m", None, None, tiny_encoder)
    assert metrics["steps"] == 3
    ckpt = load_checkpoint(tmp_path / "m" / "model.pt", text_encoder=tiny_encoder)
    assert ckpt.model_name == "minizeg"
    tower = ckpt.model.tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in before.items())  # the backbone is frozen
    torch.manual_seed(derive_seed(0, "train.init"))  # the loop's initial model
    start = build_model("minizeg", model_config(params), 32)
    assert not torch.equal(ckpt.model.prompts, start.prompts)  # the prompts trained
    assert not torch.equal(ckpt.model.residual[2].weight, start.residual[2].weight)
