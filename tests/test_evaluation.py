"""Evaluation: metrics against torchmetrics, sliding windows, real datasets, the Grounded-SAM
baseline through the one segmenter interface, ``run_evaluate`` and the prediction API, on
miniature datasets."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.real_dataset_fixtures import make_context, make_voc

from magicseg.core.config import EvaluateParams, GroundedSamParams
from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import read_image, read_json, write_image
from magicseg.evaluation.datasets import open_real_dataset
from magicseg.evaluation.real import score_dataset, score_real_datasets
from magicseg.evaluation.segmenters import GroundedSamSegmenter
from magicseg.evaluation.stage import run_evaluate
from magicseg.inference import (
    Predictor,
    SlidingPredictor,
    expand_inputs,
    labels_from_logits,
    predict,
    slide,
    window_starts,
)
from magicseg.label.grounded_sam import Detection
from magicseg.metrics import ConfusionMatrix
from magicseg.model import build_model, load_checkpoint, save_checkpoint
from magicseg.model.base import to_tensor


# --------------------------------------------------------------------------------------------
# metrics against an independent implementation
# --------------------------------------------------------------------------------------------
def _random_batches(rng, c: int, n: int = 4):
    """(pred, target) int64 batches: class 5 absent everywhere, class 7 only predicted,
    ~10% ignore (255) pixels."""
    for _ in range(n):
        target = rng.integers(0, c, (2, 17, 23))
        pred = rng.integers(0, c, (2, 17, 23))
        target[target == 5] = 6
        pred[pred == 5] = 4
        target[target == 7] = 0
        target[rng.random(target.shape) < 0.1] = 255
        yield pred, target


def test_iou_and_miou_equal_torchmetrics(rng):
    from torchmetrics.classification import MulticlassJaccardIndex

    c = 8
    ref = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255)
    cm_np, cm_torch = ConfusionMatrix(c, 255), ConfusionMatrix(c, 255)
    seen = np.zeros(c, bool)
    for pred, target in _random_batches(rng, c):
        cm_np.update(pred, target)
        cm_torch._update_torch(torch.from_numpy(pred), torch.from_numpy(target))  # GPU path
        ref.update(torch.from_numpy(pred), torch.from_numpy(target))
        keep = target != 255
        seen |= np.bincount(pred[keep], minlength=c)[:c] > 0
        seen |= np.bincount(target[keep], minlength=c)[:c] > 0
    want = ref.compute().double().numpy()
    iou = cm_np.iou()
    assert not seen[5] and math.isnan(iou[5])  # absent class: no IoU, out of the mean
    assert iou[7] == 0.0  # predicted, never in the target
    np.testing.assert_allclose(iou[seen], want[seen], rtol=0, atol=1e-6)
    assert cm_np.miou() == pytest.approx(want[seen].mean(), abs=1e-6)
    fg = seen.copy()
    fg[0] = False
    assert cm_np.miou(range(1, c)) == pytest.approx(want[fg].mean(), abs=1e-6)
    np.testing.assert_array_equal(cm_torch.matrix, cm_np.matrix)  # torch path: same counts
    np.testing.assert_array_equal(cm_torch.missed, cm_np.missed)


def test_summary_without_background_matches_torchmetrics_ignoring_background(rng):
    """The ``voc20``/``context`` variants: background pixels ignored, mean over 1..K."""
    from torchmetrics.classification import MulticlassJaccardIndex

    from magicseg.evaluation.report import summarise

    c = 6
    pred = torch.from_numpy(rng.integers(1, c, (3, 20, 20)))
    target = torch.from_numpy(rng.integers(0, c, (3, 20, 20)))
    target[0, :5] = 255
    cm = ConfusionMatrix(c, 255)
    cm.update(pred, target.masked_fill(target == 0, 255))
    ref = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255)
    want = ref(pred, target.masked_fill(target == 0, 255)).double().numpy()
    assert summarise(cm, range(1, c))["miou"] == pytest.approx(round(want[1:].mean(), 4), abs=1e-9)
    assert cm.miou(range(1, c)) == pytest.approx(want[1:].mean(), abs=1e-6)


@pytest.mark.gpu
def test_confusion_matrix_on_cuda_equals_numpy(rng):
    c = 12
    cm_np, cm_gpu = ConfusionMatrix(c, 255), ConfusionMatrix(c, 255)
    for pred, target in _random_batches(rng, c, n=3):
        cm_np.update(pred, target)
        cm_gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())
    assert cm_gpu._pending is not None and cm_gpu._pending.is_cuda
    np.testing.assert_array_equal(cm_gpu.matrix, cm_np.matrix)


# --------------------------------------------------------------------------------------------
# sliding windows
# --------------------------------------------------------------------------------------------
def test_window_grid_follows_mmseg():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # last window moved back inside
    assert window_starts(5, 8, 3) == [0]


def test_sliding_window_equals_whole_image_when_it_covers_the_image():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 5, 5))
    x = torch.rand(2, 3, 40, 52)
    whole = net(x)
    assert torch.equal(slide(net, x, window=64, stride=30), whole)
    assert torch.equal(slide(net, x, window=None, stride=None), whole)


def test_overlapping_windows_average_to_the_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 5, 1)
    x = torch.rand(2, 3, 50, 70)  # two images, crops batched 3 at a time (a partial chunk)
    out = slide(net, x, window=32, stride=20, batch_size=3)
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)


def test_sliding_window_matches_a_direct_mmseg_loop():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    x = torch.rand(1, 3, 45, 61)
    win, stride = 24, 16
    acc, cnt = torch.zeros(1, 2, 45, 61), torch.zeros(1, 1, 45, 61)
    h_grids = max(45 - win + stride - 1, 0) // stride + 1
    w_grids = max(61 - win + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * stride + win, 45), min(wi * stride + win, 61)
            y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
            acc[..., y1:y2, x1:x2] += net(x[..., y1:y2, x1:x2])
            cnt[..., y1:y2, x1:x2] += 1
    for batch_size in (1, 4):
        got = slide(net, x, win, stride, batch_size=batch_size)
        torch.testing.assert_close(got, acc / cnt, rtol=0, atol=1e-6)


def test_chunked_labels_equal_full_resize_then_argmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 10, 7, 9) * 3
    with_bg, fg = labels_from_logits(logits, (20, 25), chunk=3)
    full = F.interpolate(logits, size=(20, 25), mode="bilinear", align_corners=False)[0]
    assert torch.equal(with_bg, full.argmax(0))
    assert torch.equal(fg, full[1:].argmax(0) + 1)
    thr, _ = labels_from_logits(logits, (20, 25), bg_threshold=0.5, chunk=4)
    best = full.softmax(0)[1:].max(0)
    assert torch.equal(thr, torch.where(best.values >= 0.5, best.indices + 1, 0))
    assert 0 < (thr == 0).float().mean() < 1


# --------------------------------------------------------------------------------------------
# a tiny trained-model checkpoint
# --------------------------------------------------------------------------------------------
def _checkpoint(path, encoder, vocab, size=(32, 32)):
    torch.manual_seed(0)
    cfg = {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    model = build_model("offline", cfg, encoder.dim).eval()
    save_checkpoint(path, model, "offline", cfg, "minilm", list(vocab), [], size)
    return path


def test_sliding_predictor_equals_predictor_when_the_window_covers(tmp_path, tiny_encoder):
    ckpt = load_checkpoint(
        _checkpoint(tmp_path / "m.pt", tiny_encoder, ["dog", "cat"]), tiny_encoder
    )
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pred = Predictor(ckpt)
    pred.set_classes(["dog", "cat", "sky"])
    want = pred.predict(to_tensor([image]))[0].argmax(0)
    for window in (None, 64):
        runner = SlidingPredictor(Predictor(ckpt), window=window, stride=16)
        runner.set_classes(["dog", "cat", "sky"])
        with_bg, fg = runner(image)
        assert torch.equal(with_bg, want)
        assert fg.min() >= 1
    # windows smaller than the image still give a label per pixel at the image's size
    runner = SlidingPredictor(Predictor(ckpt), short_side=24, window=20, stride=12)
    runner.set_classes(["dog", "cat", "sky"])
    assert runner(image)[0].shape == (40, 56)


def test_templates_average_the_text_features(tmp_path, tiny_encoder):
    ckpt = load_checkpoint(_checkpoint(tmp_path / "m.pt", tiny_encoder, ["dog"]), tiny_encoder)
    pred = Predictor(ckpt)
    pred.set_classes(["dog", "cat"], templates=("a photo of a {}.", "{}"))
    a = tiny_encoder.encode(["a photo of a dog.", "a photo of a cat."])
    b = tiny_encoder.encode(["dog", "cat"])
    torch.testing.assert_close(pred._features, F.normalize((a + b) / 2, dim=-1))


# --------------------------------------------------------------------------------------------
# real datasets
# --------------------------------------------------------------------------------------------
class Oracle:
    """Predicts the label (ignore pixels as background), or all background."""

    def __init__(self, dataset, blank: bool = False):
        self.labels = {s.image.tobytes(): s.label for s in dataset}
        self.blank = blank
        self.names = None
        self.templates = None

    def set_classes(self, names, templates=None):
        self.names = list(names)
        self.templates = templates

    def segment(self, images):
        out = []
        for image in images:
            label = torch.from_numpy(self.labels[image.tobytes()].copy())
            label[label == 255] = 0
            if self.blank:
                label.zero_()
            out.append((label, label))
        return out


def test_oracle_scores_one_and_background_scores_by_hand(tmp_path):
    voc, labels = make_voc(tmp_path, classes=(12, 15, 12))
    ds = open_real_dataset("voc", voc)
    m = score_real_datasets(
        {"voc": ds},
        Oracle(ds),
        "oracle",
        gallery_samples=2,
        per_class_dir=tmp_path / "pc",
        gallery_dir=tmp_path / "gal",
    )
    assert m["voc"]["miou"] == 1.0 and m["voc20"]["miou"] == 1.0
    assert m["voc"]["images"] == 3 and m["voc"]["classes_scored"] == 3
    assert m["voc"]["segmenter"] == "oracle" and m["voc"]["iou_background"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "pc" / "voc.csv")))
    assert [r["class"] for r in rows] == ["background", "dog", "person"]
    assert [float(r["iou"]) for r in rows] == [1.0, 1.0, 1.0]
    assert "background" not in {r["class"] for r in csv.DictReader(open(tmp_path / "pc/voc20.csv"))}
    gallery = read_image(tmp_path / "gal" / "voc.png")
    assert gallery.shape[0] > 2 * 128 and gallery.shape[1] >= 3 * 176

    blank = score_real_datasets({"voc": ds}, Oracle(ds, blank=True), "oracle")
    scored = np.concatenate([lb[lb != 255] for lb in labels])
    bg_iou = (scored == 0).sum() / scored.size  # TP = bg pixels, union = every scored pixel
    assert blank["voc"]["miou"] == pytest.approx(round(bg_iou / 3, 4))  # dog, person: IoU 0
    assert blank["voc20"]["miou"] == 0.0
    assert blank["voc"]["pixel_acc"] == pytest.approx(round(bg_iou, 4))


def test_context_variants_score_59_and_60_classes(tmp_path):
    ctx, _ = make_context(tmp_path)
    ds = open_real_dataset("context", ctx)
    cms, shown = score_dataset(ds, Oracle(ds), gallery=1)
    assert set(cms) == {"context", "context60"} and len(shown) == 1
    assert cms["context"].matrix[0].sum() == 0  # background ignored in the 59-class variant
    assert cms["context60"].matrix[0, 0] > 0
    assert cms["context"].num_classes == 60


def test_context_pc60_text_scores_background_as_a_text_class(tmp_path):
    """``evaluate.context.protocol: pc60_text``: "background" is the first of 60 text
    classes, encoded with the 15 ZegCLIP templates, and every labelled pixel is scored."""
    from magicseg.core.config import EvaluateParams
    from magicseg.core.templates import ZEGCLIP_TEMPLATES
    from magicseg.evaluation.real import open_enabled

    ctx, labels = make_context(tmp_path)
    params = EvaluateParams(context={"enabled": True, "root": str(ctx), "protocol": "pc60_text"})
    ds = open_enabled(params)["context"]
    assert ds.names[0] == "background" and len(ds.names) == 60
    assert ds.variants == {"context60_text": False}
    samples = list(ds)
    for sample, raw in zip(samples, labels, strict=True):
        assert (sample.label == raw.astype(np.int64) + 1).all()  # background 0 -> text class 1
    oracle = Oracle(ds)
    m = score_real_datasets({"context": ds}, oracle, "oracle", per_class_dir=tmp_path / "pc")
    assert oracle.templates == ZEGCLIP_TEMPLATES and oracle.names[0] == "background"
    assert set(m) == {"context60_text"} and m["context60_text"]["miou"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "pc/context60_text.csv")))
    assert rows[0]["class"] == "background"  # scored as a class like the others
    # a model that says "background" (text class 1) everywhere: IoU of that class only
    blank = score_real_datasets({"context": ds}, BackgroundText(ds), "bg")
    bg = np.concatenate([lb.ravel() for lb in labels]) == 0
    assert blank["context60_text"]["pixel_acc"] == pytest.approx(round(bg.mean(), 4))
    # pc59 (the default) keeps both classic variants and evaluate.templates
    pc59 = open_enabled(EvaluateParams(context={"enabled": True, "root": str(ctx)}))["context"]
    assert pc59.variants == {"context": False, "context60": True} and pc59.templates is None
    from magicseg.core.config import parse_params
    from magicseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"evaluate\.context\.protocol"):
        parse_params({"evaluate": {"context": {"protocol": "pc60"}}})


class BackgroundText(Oracle):
    """Predicts text class 1 ("background" under pc60_text) everywhere."""

    def segment(self, images):
        return [(torch.ones(im.shape[:2], dtype=torch.int64),) * 2 for im in images]


def test_checkpoint_on_voc_through_run_evaluate(tmp_path, tiny_encoder, tiny_data):
    vocab_dir, _, vocab = tiny_data
    ckpt = _checkpoint(tmp_path / "m.pt", tiny_encoder, vocab.names)
    voc, _ = make_voc(tmp_path)
    params = EvaluateParams(
        test_samples=4,
        gallery_samples=2,
        short_side=40,
        window=32,
        stride=20,
        templates=("a photo of a {}.",),
        voc={"enabled": True, "root": str(voc)},
    )
    m = run_evaluate(
        ckpt,
        vocab_dir,
        params,
        seed=0,
        metrics_path=tmp_path / "metrics" / "eval.json",
        plots_dir=tmp_path / "plots",
        text_encoder=tiny_encoder,
    )
    assert set(m) == {"procedural", "baselines", "voc", "voc20"}
    assert read_json(tmp_path / "metrics" / "eval.json") == m
    assert 0.0 <= m["voc"]["miou"] <= 1.0 and m["voc"]["segmenter"] == "trained"
    assert m["procedural"]["segmenter"] == "trained" and m["procedural"]["samples"] == 4
    for name in ("procedural", "voc", "voc20"):
        assert (tmp_path / f"plots/per_class/{name}.csv").is_file(), name
    for name in ("procedural", "voc"):
        assert (tmp_path / f"plots/gallery/{name}.png").is_file(), name


def test_another_vocabulary_is_scored_on_the_real_datasets_only(tmp_path, tiny_encoder, capsys):
    """With the paper's LVIS vocabulary there is no procedural test set to render: the real
    datasets are scored."""
    from magicseg.core.io import write_manifest
    from magicseg.core.vocabulary import build_vocabulary

    vocab = build_vocabulary("lvis")
    write_manifest(tmp_path / "vocab", vocab.to_frame())
    ckpt = _checkpoint(tmp_path / "m.pt", tiny_encoder, vocab.names)
    voc, _ = make_voc(tmp_path)
    params = EvaluateParams(gallery_samples=1, voc={"enabled": True, "root": str(voc)})
    m = run_evaluate(
        ckpt, tmp_path / "vocab", params, 0, plots_dir=tmp_path / "plots", text_encoder=tiny_encoder
    )
    assert set(m) == {"voc", "voc20"} and m["voc"]["images"] == 3
    assert "'lvis' vocabulary: no procedural test set" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "plots/per_class").iterdir()) == [
        "voc.csv",
        "voc20.csv",
    ]


def test_another_vocabulary_without_a_real_dataset_is_a_note_not_an_error(tmp_path, capsys):
    """Nothing to score after training is said in the metrics and in one line; no model is
    loaded (the checkpoint here does not exist)."""
    from magicseg.core.io import write_manifest
    from magicseg.core.vocabulary import build_vocabulary

    write_manifest(tmp_path / "vocab", build_vocabulary("lvis").to_frame())
    m = run_evaluate(
        tmp_path / "no-such-model.pt",
        tmp_path / "vocab",
        EvaluateParams(),
        0,
        metrics_path=tmp_path / "eval.json",
        plots_dir=tmp_path / "plots",
    )
    assert m["test_sets"] == 0 and "vocabulary.source: procedural (got 'lvis')" in m["note"]
    assert read_json(tmp_path / "eval.json") == m
    assert (tmp_path / "plots").is_dir()  # the stage's declared output exists
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"evaluate: {m['note']}"]


def test_missing_dataset_fails_before_the_model_is_loaded(tmp_path):
    params = EvaluateParams(voc={"enabled": True, "root": str(tmp_path / "VOC2012")})
    with pytest.raises(DataError, match="expected layout: VOCdevkit/VOC2012"):
        run_evaluate(tmp_path / "no-such-model.pt", tmp_path, params, seed=0)


# --------------------------------------------------------------------------------------------
# the Grounded-SAM baseline
# --------------------------------------------------------------------------------------------
class FakeLabeler:
    """Records what the segmenter asks; one box of the last class, a fixed mask."""

    def __init__(self):
        self.asked = None

    def detect(self, images, classes):
        self.asked = classes
        ids, _ = classes[0]
        return [[Detection(ids[-1], 0.9, (0, 0, 4, 4)), Detection(ids[0], 0.5, (0, 0, 8, 8))]]

    def segment(self, images, dets):
        h, w = images[0].shape[:2]
        masks = np.zeros((2, h, w), bool)
        masks[0, :4, :4] = True
        masks[1, :8, :8] = True
        return [masks]


def test_grounded_sam_segmenter_captions_all_classes_and_composes_by_score():
    lab = FakeLabeler()
    seg = GroundedSamSegmenter(lab)
    seg.set_classes(["bat (animal)", "dog", "wood"])
    [(with_bg, fg)] = seg.segment([np.zeros((10, 12, 3), np.uint8)])
    assert lab.asked == [((1, 2, 3), ("bat", "dog", "wood"))]  # display names, 1-based ids
    assert torch.equal(with_bg, fg)
    assert (with_bg[:4, :4] == 3).all() and (with_bg[4:8, 4:8] == 1).all()
    assert (with_bg[8:] == 0).all()


@pytest.fixture(scope="module")
def gsam_dirs(tmp_path_factory):
    from tests.tiny_grounded_sam import save_grounded_sam

    return save_grounded_sam(tmp_path_factory.mktemp("gsam"))


def test_grounded_sam_baseline_runs_by_name(tmp_path, gsam_dirs, tiny_data):
    """``evaluate.segmenter: grounded_sam`` through the real loading path (random tiny
    models): the procedural test set and VOC, every output written."""
    vocab_dir, _, _ = tiny_data
    voc, _ = make_voc(tmp_path, classes=(12,))
    det, seg = gsam_dirs
    gsam = GroundedSamParams(detector_checkpoint=str(det), sam_checkpoint=str(seg), device="cpu")
    params = EvaluateParams(
        segmenter="grounded_sam",
        test_samples=3,
        gallery_samples=2,
        voc={"enabled": True, "root": str(voc)},
    )
    m = run_evaluate(
        None,
        vocab_dir,
        params,
        seed=0,
        grounded_sam=gsam,
        procedural_size=(48, 48),
        metrics_path=tmp_path / "eval.json",
        plots_dir=tmp_path / "plots",
    )
    assert set(m) == {"procedural", "baselines", "voc", "voc20"}
    assert m["procedural"]["samples"] == 3 and m["procedural"]["segmenter"] == "grounded_sam"
    assert m["voc"]["segmenter"] == "grounded_sam" and m["voc"]["images"] == 1
    assert 0.0 <= m["voc"]["miou"] <= 1.0
    for out in ("procedural.csv", "voc.csv", "voc20.csv"):
        assert (tmp_path / "plots/per_class" / out).is_file(), out
    for out in ("procedural.png", "voc.png"):
        assert (tmp_path / "plots/gallery" / out).is_file(), out


def test_grounded_sam_baseline_finds_the_scripted_object(tmp_path, gsam_dirs):
    """A scripted detector that fires on "dog" over the bright centre: dog pixels only."""
    from tests.test_label_grounded_sam import ScriptedDetector
    from tests.tiny_grounded_sam import bert_tokenizer

    from magicseg.label.grounded_sam import GroundedSamLabeler

    det, seg = gsam_dirs
    lab = GroundedSamLabeler(
        GroundedSamParams(detector_checkpoint=str(det), sam_checkpoint=str(seg), device="cpu")
    )
    dog = bert_tokenizer()("dog", add_special_tokens=False)["input_ids"]
    lab.detector = ScriptedDetector(lab.detector.config, dog)
    voc, _ = make_voc(tmp_path, classes=(12,))
    ds = open_real_dataset("voc", voc)
    cms, shown = score_dataset(ds, GroundedSamSegmenter(lab), gallery=1)
    assert set(np.unique(shown[0][2])) <= {0, 12}
    predicted = cms["voc"].matrix.sum(0)
    assert predicted[12] > 0 and predicted[1:12].sum() == 0 and predicted[13:].sum() == 0


# --------------------------------------------------------------------------------------------
# the SAM 3 baseline
# --------------------------------------------------------------------------------------------
class FakeSam3:
    """Records what the segmenter asks; two instances of two classes, overlapping."""

    def __init__(self):
        self.asked = None

    def predict(self, images, classes):
        from magicseg.label.sam3 import Prediction

        self.asked = classes
        ids, _ = classes[0]
        h, w = images[0].shape[:2]
        masks = np.zeros((2, h, w), bool)
        masks[0, :4, :4] = True
        masks[1, :8, :8] = True
        dets = [Detection(ids[-1], 0.9, (0, 0, 4, 4)), Detection(ids[0], 0.5, (0, 0, 8, 8))]
        return [Prediction(dets, masks, [0.9] * len(ids)), Prediction([], None, [0.0] * len(ids))]


def test_sam3_segmenter_prompts_every_class_and_composes_by_score():
    from magicseg.evaluation.segmenters import Sam3Segmenter

    lab = FakeSam3()
    seg = Sam3Segmenter(lab)
    seg.set_classes(["bat (animal)", "dog", "wood"])
    [(with_bg, fg), (empty, _)] = seg.segment([np.zeros((10, 12, 3), np.uint8)] * 2)
    assert lab.asked == [((1, 2, 3), ("bat", "dog", "wood"))] * 2  # display names, 1-based
    assert torch.equal(with_bg, fg)
    assert (with_bg[:4, :4] == 3).all() and (with_bg[4:8, 4:8] == 1).all()
    assert (with_bg[8:] == 0).all() and not empty.any()


def test_sam3_baseline_runs_by_name_and_needs_the_licence(tmp_path, tiny_data):
    """``evaluate.segmenter: sam3`` through the real loading path (random tiny SAM 3)."""
    from tests.tiny_labelers import save_sam3

    from magicseg.core.config import Sam3Params

    vocab_dir, _, _ = tiny_data
    voc, _ = make_voc(tmp_path, classes=(12,))
    sam3 = Sam3Params(checkpoint=str(save_sam3(tmp_path / "models")), device="cpu")
    params = EvaluateParams(
        segmenter="sam3", test_samples=2, gallery_samples=1, voc={"enabled": True, "root": str(voc)}
    )
    kw = {"procedural_size": (48, 48), "sam3": sam3}
    with pytest.raises(BackendError, match="^label.sam3.accept_licence: "):
        run_evaluate(None, vocab_dir, params, seed=0, **kw)
    kw["sam3"] = sam3.model_copy(update={"accept_licence": True})
    m = run_evaluate(None, vocab_dir, params, seed=0, metrics_path=tmp_path / "e.json", **kw)
    assert m["procedural"]["samples"] == 2 and m["procedural"]["segmenter"] == "sam3"
    assert m["voc"]["segmenter"] == "sam3" and 0.0 <= m["voc"]["miou"] <= 1.0


# --------------------------------------------------------------------------------------------
# prediction API and CLI on folders and globs
# --------------------------------------------------------------------------------------------
def test_predict_api_on_folders_globs_and_arrays(tmp_path, tiny_encoder):
    ckpt = _checkpoint(tmp_path / "m.pt", tiny_encoder, ["dog"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(32, 32, 3), (60, 90, 3)]]
    for i, im in enumerate(images):
        write_image(tmp_path / "imgs" / f"{i}.png", im)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert expand_inputs([tmp_path / "imgs"]) == [tmp_path / "imgs/0.png", tmp_path / "imgs/1.png"]
    assert expand_inputs(str(tmp_path / "**" / "1.png")) == [tmp_path / "imgs/1.png"]
    loaded = load_checkpoint(ckpt, tiny_encoder)
    from_folder = predict(tmp_path / "imgs", "dog, cat", loaded, device="cpu")
    from_arrays = predict(images, ["dog", "cat"], loaded, device="cpu")
    assert [m.shape for m in from_folder] == [(32, 32), (60, 90)]
    for a, b in zip(from_folder, from_arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert from_folder[1].max() <= 2 and from_folder[1].dtype == np.int64
    sliding = predict(images[1], "dog,cat", loaded, window=32, stride=24, device="cpu")
    assert sliding[0].shape == (60, 90)
    with pytest.raises(DataError, match="no images"):
        predict(str(tmp_path / "*.jpg"), "dog", loaded)


def test_cli_predict_on_a_folder_with_sliding_windows(tmp_path):
    from typer.testing import CliRunner

    from magicseg.cli import app
    from magicseg.core.io import read_mask

    torch.manual_seed(0)
    cfg = {"width": 8, "depth": 2, "embed_dim": 16, "text_encoder": "minilm"}
    model = build_model("offline", cfg, 384).eval()
    save_checkpoint(tmp_path / "m.pt", model, "offline", cfg, "minilm", ["dog"], [], (32, 32))
    rng = np.random.default_rng(0)
    write_image(tmp_path / "in" / "big.png", rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "in"),
            "--classes",
            "dog,cat",
            "--checkpoint",
            str(tmp_path / "m.pt"),
            "--out",
            str(tmp_path / "out"),
            "--short-side",
            "48",
            "--window",
            "32",
            "--stride",
            "20",
            "--template",
            "a photo of a {}.",
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_mask(tmp_path / "out" / "big.mask.png").shape == (70, 100)
