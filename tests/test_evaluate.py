"""Confusion-matrix metrics, the procedural test set and the evaluate stage."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from magicseg.core.config import EvaluateParams
from magicseg.core.errors import DataError
from magicseg.core.io import read_image, read_json
from magicseg.core.seeding import derive_seed
from magicseg.core.vocabulary import build_vocabulary
from magicseg.evaluation.procedural import make_test_records
from magicseg.evaluation.report import summarise
from magicseg.evaluation.stage import run_evaluate
from magicseg.metrics import ConfusionMatrix
from magicseg.model import build_model, save_checkpoint


def test_confusion_matrix_hand_computed():
    # classes 0 (bg), 1, 2, 3; 3 never appears in target nor prediction; 255 = ignore
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred, target)
    # ignore pixels are skipped entirely (their predictions 2 and 1 count nowhere)
    assert cm.matrix.sum() == 6
    # bg: TP 1, FP 1 (a 2 predicted bg), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 1, FN 1 -> 1/2; class 3: absent -> NaN and out of the means
    iou = cm.iou()
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.miou([1, 2, 3]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(cm.miou([3]))
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    assert cm.present().tolist() == [True, True, True, False]
    # streaming: a second update adds up, tensors accepted
    cm.update(torch.tensor([3]), torch.tensor([3]))
    assert cm.iou()[3] == 1.0 and cm.matrix.sum() == 7


def test_confusion_matrix_out_of_range_prediction_is_a_miss():
    cm = ConfusionMatrix(2, ignore_index=None)
    cm.update(np.array([5, 1]), np.array([1, 1]))
    assert cm.iou()[1] == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(0.5)


def test_summary_reports_each_held_out_kind():
    # classes 1, 2 seen; 3 a new combination; 4 and 5 with a novel word (5 absent from the test)
    target = np.array([[1, 1, 2, 2], [3, 3, 4, 4]])
    pred = np.array([[1, 1, 2, 0], [3, 0, 0, 0]])
    cm = ConfusionMatrix(6, ignore_index=255)
    cm.update(pred, target)
    out = summarise(cm, range(1, 6), [1, 2], [3, 4, 5], {"combination": [3], "novel": [4, 5]})
    assert out["miou_seen"] == pytest.approx((1 + 1 / 2) / 2, abs=1e-4)
    assert out["miou_heldout_combination"] == 0.5 and out["miou_heldout_novel"] == 0.0
    assert out["miou_heldout"] == pytest.approx(0.25)
    # without kinds (vocabularies held out before kinds existed) the keys are None
    bare = summarise(cm, range(1, 6), [1, 2], [3, 4, 5])
    assert bare["miou_heldout_combination"] is None and bare["miou_heldout_novel"] is None


def test_test_records_cover_every_class_with_fresh_seeds():
    vocab = build_vocabulary("procedural", holdout_combination=8, holdout_novel_words=1, seed=0)
    n = 2 * len(vocab)
    recs = make_test_records(vocab, n, seed=0)
    firsts = [r.class_ids[0] for r in recs]
    assert sorted(set(firsts)) == list(range(1, len(vocab) + 1))
    assert all(firsts.count(c) == 2 for c in set(firsts))
    assert 0.15 < np.mean([len(r.class_ids) == 2 for r in recs]) < 0.45
    assert [r.seed for r in recs] == [derive_seed(0, "evaluate.test_sample", i) for i in range(n)]
    train_seeds = {
        derive_seed(0, "generate.sample", f"r{r:06d}-{k:03d}")
        for r in range(300)
        for k in range(10)
    }
    assert not train_seeds & {r.seed for r in recs}
    assert all(n in r.prompt.lower() for r in recs for n in r.class_names)
    assert make_test_records(vocab, n, seed=0) == recs


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_data, tiny_encoder):
    vocab_dir, _, vocab = tiny_data
    torch.manual_seed(0)
    cfg = {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    model = build_model("offline", cfg, tiny_encoder.dim).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, model, "offline", cfg, "tiny", list(vocab.names), sorted(vocab.holdout), (32, 32)
    )
    return path


def test_evaluate_writes_metrics_table_and_gallery(
    tmp_path, tiny_data, tiny_encoder, tiny_checkpoint
):
    vocab_dir, _, vocab = tiny_data
    params = EvaluateParams(test_samples=64, batch_size=16, gallery_samples=3)
    out = run_evaluate(
        tiny_checkpoint,
        vocab_dir,
        params,
        seed=0,
        metrics_path=tmp_path / "eval.json",
        plots_dir=tmp_path / "plots",
        text_encoder=tiny_encoder,
    )
    assert read_json(tmp_path / "eval.json") == out
    proc = out["procedural"]
    assert proc["samples"] == 64
    for key in ("miou", "miou_seen", "miou_heldout", "pixel_acc", "iou_background"):
        assert 0.0 <= proc[key] <= 1.0, key
    for kind in ("combination", "novel"):  # None when no class of the kind is in the test
        assert proc[f"miou_heldout_{kind}"] is None or 0 <= proc[f"miou_heldout_{kind}"] <= 1
    assert 0.0 <= proc["cf_fg_rate"] <= 1.0
    # all-background baseline: zero foreground IoU, pixel accuracy = background share
    bg = out["baselines"]["all_background"]
    assert bg["miou"] == 0.0 and bg["miou_seen"] == 0.0 and bg["miou_heldout"] == 0.0
    assert 0.5 < bg["pixel_acc"] < 1.0 and bg["pixel_acc"] == pytest.approx(bg["iou_background"])
    mf = out["baselines"]["most_frequent"]
    assert mf["class"] in vocab.names and mf["pixel_acc"] < 0.5
    with open(tmp_path / "plots/per_class/procedural.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["class"] == "background"
    splits = {r["split"] for r in rows[1:]}
    assert splits == {"seen", "heldout"}
    held = {vocab.names[c - 1] for c in vocab.holdout}
    assert all((r["split"] == "heldout") == (r["class"] in held) for r in rows[1:])
    kind = {vocab.names[c - 1]: vocab.holdout_kind(c) or "" for c in range(1, len(vocab) + 1)}
    assert rows[0]["holdout_kind"] == ""
    assert all(r["holdout_kind"] == kind[r["class"]] for r in rows[1:])
    gallery = read_image(tmp_path / "plots/gallery/procedural.png")
    assert gallery.shape[0] > 3 * 128 and gallery.shape[1] >= 5 * 128


def test_evaluate_refuses_another_vocabulary(tmp_path, tiny_encoder, tiny_checkpoint):
    from magicseg.core.io import write_manifest

    other = build_vocabulary("procedural", holdout_combination=4, seed=3, limit=20)
    write_manifest(tmp_path / "vocab2", other.to_frame())
    with pytest.raises(DataError, match="another vocabulary"):
        run_evaluate(
            tiny_checkpoint,
            tmp_path / "vocab2",
            EvaluateParams(test_samples=2),
            0,
            text_encoder=tiny_encoder,
        )
