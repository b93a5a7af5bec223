"""Grounded-SAM labeler on tiny random Grounding DINO and SAM loaded through the real path.

Random detectors detect nonsense, so the class mapping, the mask composition and the
counterfactual check are driven by constructed detector outputs (a scripted detector module in
place of the loaded one); SAM stays the real tiny model.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tests.tiny_grounded_sam import bert_tokenizer, save_grounded_sam

from magicseg.core.config import GroundedSamParams, LabelParams
from magicseg.core.errors import BackendError, ConfigError
from magicseg.core.io import read_manifest, read_mask, write_image, write_manifest
from magicseg.label import LABELERS, run_label
from magicseg.label.base import LabelInput
from magicseg.label.grounded_sam import (
    Detection,
    GroundedSamLabeler,
    box_iou,
    build_captions,
    class_scores,
    compose_mask,
    detector_pixels,
    match_classes,
    nms_per_class,
    segmenter_pixels,
)

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_grounded_sam(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tokenizer():
    return bert_tokenizer()


def _params(model_dirs, **kw) -> GroundedSamParams:
    det, seg = model_dirs
    return GroundedSamParams(
        detector_checkpoint=str(det), sam_checkpoint=str(seg), device="cpu", **kw
    )


# --------------------------------------------------------------------------------------------
# captions and phrase -> class
# --------------------------------------------------------------------------------------------
def test_caption_spans_cover_each_class_name(tokenizer):
    (cap,) = build_captions(["school bus", "owl"], tokenizer, max_tokens=256)
    assert cap.text == "school bus. owl."
    assert cap.positions == (0, 1)
    words = [tokenizer.decode(list(cap.input_ids[a:b])) for a, b in cap.spans]
    assert words == ["school bus", "owl"]
    assert cap.input_ids[0] == tokenizer.cls_token_id
    assert cap.input_ids[-1] == tokenizer.sep_token_id


def test_long_vocabulary_is_split_under_the_token_limit(tokenizer):
    names = [f"thing number {i}" for i in range(40)]  # 4 tokens each with the "."
    caps = build_captions(names, tokenizer, max_tokens=18)
    assert len(caps) == 10  # (18 - 2) // 4 = 4 names per caption
    assert all(len(c.input_ids) <= 18 for c in caps)
    assert [p for c in caps for p in c.positions] == list(range(40))
    for cap in caps:
        for pos, (a, b) in zip(cap.positions, cap.spans, strict=True):
            assert tokenizer.decode(list(cap.input_ids[a:b])) == names[pos]


def test_name_longer_than_the_limit_is_an_error(tokenizer):
    with pytest.raises(BackendError, match="token caption limit"):
        build_captions(["a very long class name indeed"], tokenizer, max_tokens=5)


def test_match_classes_picks_the_class_whose_tokens_fired():
    # caption "[CLS] school bus . owl . [SEP]": spans bus=(1, 3), owl=(4, 5)
    spans = [(1, 3), (4, 5)]
    probs = np.full((5, 7), 0.01, np.float32)
    probs[0, 2] = 0.9  # "bus" token -> class 0
    probs[1, 4] = 0.8  # "owl" -> class 1
    probs[1, 1] = 0.4  # weaker "school" as well: owl still wins
    probs[2, 3] = 0.95  # only the "." separator fired -> dropped
    probs[3, 4] = 0.28  # above text_threshold, below box_threshold -> dropped
    probs[4, 0] = 0.99  # [CLS] -> dropped
    cls, score = match_classes(probs, spans, box_threshold=0.3, text_threshold=0.25)
    assert cls.tolist() == [0, 1, -1, -1, -1]
    assert score[:2] == pytest.approx([0.9, 0.8])


def test_match_classes_all_tokens_is_the_published_box_filter():
    """``box_score: all``: a box is kept when any caption token (separators, [CLS] too) passes
    the box threshold, as the published ``get_grounding_output``; its class is still the one
    whose tokens score highest."""
    spans = [(1, 3), (4, 5)]
    probs = np.full((4, 7), 0.01, np.float32)
    probs[0, 2] = 0.9  # "bus" -> class 0 either way
    probs[1, 3] = 0.95  # the "." separator only: kept, class of the best class token
    probs[1, 4] = 0.05  # owl a little above bus
    probs[2, 4] = 0.28  # below the box threshold on every token -> dropped either way
    probs[3, 0] = 0.99  # [CLS] only: kept
    cls, score = match_classes(probs, spans, 0.3, 0.25, box_score="all")
    assert cls.tolist() == [0, 1, -1, 0]
    assert score[:2] == pytest.approx([0.9, 0.05])
    assert match_classes(probs, spans, 0.3, 0.25)[0].tolist() == [0, -1, -1, -1]
    with pytest.raises(ConfigError, match="label.grounded_sam.box_score"):
        match_classes(probs, spans, 0.3, 0.25, box_score="any")


def test_per_class_nms_keeps_overlaps_of_different_classes():
    dets = [
        Detection(3, 0.9, (0, 0, 10, 10)),
        Detection(3, 0.8, (1, 1, 10, 10)),  # IoU 0.81 with the first: suppressed
        Detection(3, 0.7, (20, 20, 30, 30)),  # same class, elsewhere: kept
        Detection(7, 0.6, (0, 0, 10, 10)),  # other class, same box: kept
    ]
    kept = nms_per_class(dets, iou=0.5)
    assert [(d.class_id, d.score) for d in kept] == [(3, 0.9), (3, 0.7), (7, 0.6)]
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10]]))[0, 0] == pytest.approx(
        1 / 3
    )


def test_compose_mask_resolves_overlaps_by_score():
    masks = np.zeros((3, 4, 6), bool)
    masks[0, :, :4] = True  # class 3, score 0.5
    masks[1, :, 2:] = True  # class 7, score 0.9: wins columns 2-3
    masks[2, 0, :] = True  # class 5, score 0.1: only where nobody else is (nowhere)
    mask = compose_mask(masks, [3, 7, 5], [0.5, 0.9, 0.1])
    assert mask.dtype == np.int64
    assert mask[1].tolist() == [3, 3, 7, 7, 7, 7]
    assert mask[0].tolist() == [3, 3, 7, 7, 7, 7]
    # the order of the inputs does not matter
    again = compose_mask(masks[[1, 2, 0]], [7, 5, 3], [0.9, 0.1, 0.5])
    np.testing.assert_array_equal(mask, again)


def test_class_scores_zero_for_undetected():
    dets = [Detection(7, 0.6, (0, 0, 1, 1)), Detection(7, 0.8, (0, 0, 2, 2))]
    assert class_scores(dets, [3, 7]) == [0.0, pytest.approx(0.8)]


# --------------------------------------------------------------------------------------------
# the labeler with a scripted detector and the real tiny SAM
# --------------------------------------------------------------------------------------------
class ScriptedDetector(torch.nn.Module):
    """Stands in for Grounding DINO: query 0 fires on ``word``'s tokens with a centred box
    (cxcywh 0.5, 0.5, 0.5, 0.5) when the image's centre is bright (mean normalised pixel of the
    middle third > 0); query 1
    is a duplicate box of lower score (per-class NMS must drop it); query 2 fires on the "."
    separators only (must be ignored)."""

    def __init__(self, config, word_ids: list[int]):
        super().__init__()
        self.config = config
        self.word_ids = word_ids

    def forward(self, pixel_values, input_ids, **_):
        b, t = input_ids.shape
        logits = torch.full((b, 3, t), -9.0)
        boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.51, 0.5, 0.5, 0.5], [0.2, 0.2, 0.1, 0.1]])
        for i in range(b):
            ids = input_ids[i].tolist()
            hits = [j for j in range(t) if ids[j] in self.word_ids]
            h, w = pixel_values.shape[-2:]
            centre = pixel_values[i, :, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
            if centre.float().mean() > 0 and hits:
                logits[i, 0, hits] = 3.0  # sigmoid 0.95
                logits[i, 1, hits] = 1.0  # 0.73
            dots = [j for j in range(t) if ids[j] == 1012]
            logits[i, 2, dots] = 5.0
        return SimpleNamespace(logits=logits, pred_boxes=boxes.expand(b, 3, 4))


SQUARE = (slice(24, 72), slice(32, 96))  # rows, columns of the "object" in a 96x128 image


def _pair(object_in_pos: bool, object_in_cf: bool, names=("school bus", "owl"), ids=(3, 7)):
    """A dark noisy 96x128 scene; the object is a bright square in its middle."""
    rng = np.random.default_rng(0)
    scene = np.clip(rng.normal(30, 5, (96, 128, 3)), 0, 255).astype(np.uint8)
    pos, cf = scene.copy(), scene.copy()
    if object_in_pos:
        pos[SQUARE] = 230
    if object_in_cf:
        cf[SQUARE] = 230
    return LabelInput(id="s", positive=pos, counterfactual=cf, class_ids=ids, class_names=names)


@pytest.fixture(scope="module")
def labeler(model_dirs, tokenizer):
    lab = GroundedSamLabeler(_params(model_dirs, batch_size=3))
    owl = tokenizer("owl", add_special_tokens=False)["input_ids"]
    lab.detector = ScriptedDetector(lab.detector.config, owl)
    return lab


def test_boxes_map_to_vocabulary_classes_and_masks_are_class_indexed(labeler):
    (res,) = labeler.label([_pair(True, False)], ignore=255)
    # one owl box (duplicate suppressed, separator-only query ignored), class 7 not index 1
    assert [d["class_id"] for d in res.detections] == [7]
    assert res.detections[0]["score"] == pytest.approx(0.9526, abs=1e-3)
    assert res.detections[0]["box"] == pytest.approx([32.0, 24.0, 96.0, 72.0], abs=0.01)
    assert res.scores == [0.0, pytest.approx(0.9526, abs=1e-3)]  # aligned with (bus, owl)
    assert res.mask.shape == (96, 128)
    assert set(np.unique(res.mask)) <= {0, 7}


def test_counterfactual_check_flags_a_class_still_present(labeler):
    removed, still_there, nothing = labeler.label(
        [_pair(True, False), _pair(True, True), _pair(False, False)], ignore=255
    )
    assert removed.cf_detected == [False, False]
    assert still_there.cf_detected == [False, True]
    assert [d["class_id"] for d in still_there.meta["cf_detections"]] == [7]
    assert nothing.detections == [] and nothing.scores == [0.0, 0.0]
    # no box on the positive: its counterfactual is not sent to the detector
    assert [r.meta["cf_checked"] for r in (removed, still_there, nothing)] == [True, True, False]
    assert not nothing.mask.any()
    for res in (removed, still_there, nothing):
        assert 0.0 <= res.cf_agreement <= 1.0
    # the pair differs exactly on the square: agreement is the SAM mask's IoU with it
    square = np.zeros((96, 128), bool)
    square[SQUARE] = True
    fg = removed.mask > 0
    expected = (fg & square).sum() / (fg | square).sum()
    assert removed.cf_agreement == pytest.approx(expected, abs=0.03)
    assert still_there.cf_agreement == pytest.approx(0.0 if fg.any() else 1.0)  # no difference


def test_cf_check_off_leaves_fields_empty(model_dirs, tokenizer):
    lab = GroundedSamLabeler(_params(model_dirs, cf_check=False))
    lab.detector = ScriptedDetector(lab.detector.config, tokenizer("owl")["input_ids"][1:-1])
    (res,) = lab.label([_pair(True, True)], ignore=255)
    assert res.cf_detected is None and res.cf_agreement is None
    assert [d["class_id"] for d in res.detections] == [7]


def test_segment_decodes_every_box_at_image_size(model_dirs):
    lab = GroundedSamLabeler(_params(model_dirs))
    img = np.zeros((80, 128, 3), np.uint8)
    dets = [Detection(3, 0.9, (0, 0, 64, 40)), Detection(7, 0.5, (64, 40, 128, 80))]
    masks = lab.segment([img, img], [dets, []])
    assert masks[0].shape == (2, 80, 128) and masks[0].dtype == bool
    assert masks[1] is None
    assert lab.timings.parts["sam_encoder"] > 0 and lab.timings.parts["sam_decoder"] > 0


def test_random_models_run_end_to_end_in_bfloat16(model_dirs):
    lab = GroundedSamLabeler(_params(model_dirs, dtype="bfloat16", box_threshold=0.0))
    assert lab.detector.dtype == torch.bfloat16 and lab.segmenter.dtype == torch.bfloat16
    (res,) = lab.label([_pair(True, False)], ignore=255)
    assert res.detections  # threshold 0 keeps every query that matched a class token
    assert {d["class_id"] for d in res.detections} <= {3, 7}
    assert set(np.unique(res.mask)) <= {0, 3, 7}


# --------------------------------------------------------------------------------------------
# the stage through the registry, and errors
# --------------------------------------------------------------------------------------------
def test_run_label_writes_boxes_and_survives_a_corrupt_image(model_dirs, tmp_path):
    gen = tmp_path / "generate"
    rows = []
    for i in range(3):
        pair = _pair(True, False)
        write_image(gen / f"images/{i}.png", pair.positive)
        write_image(gen / f"cf/{i}.png", pair.counterfactual)
        rows.append(
            {
                "id": f"s{i}",
                "prompt": "an owl",
                "class_ids": [3, 7],
                "class_names": ["school bus", "owl"],
                "image": f"images/{i}.png",
                "cf_image": f"cf/{i}.png",
                "oracle_mask": None,
            }
        )
    (gen / "images/1.png").write_bytes(b"not a png")
    write_manifest(gen, pd.DataFrame(rows))
    det, seg = model_dirs
    params = LabelParams(
        backend="grounded_sam",
        grounded_sam=GroundedSamParams(
            detector_checkpoint=str(det), sam_checkpoint=str(seg), device="cpu", box_threshold=0.0
        ),
    )
    out = run_label(
        gen, tmp_path / "label", params, num_classes=10, metrics_path=tmp_path / "m.json"
    )
    assert out["mask"].isna().tolist() == [False, True, False]
    assert json.loads((tmp_path / "m.json").read_text())["unreadable"] == 1
    back = read_manifest(tmp_path / "label")
    for _, row in back.loc[back["mask"].notna()].iterrows():
        assert len(row["boxes"]) == len(row["box_classes"]) == len(row["box_scores"]) > 0
        assert all(len(b) == 4 for b in row["boxes"])
        assert set(row["box_classes"]) <= {3, 7}
        assert len(row["cf_detected"]) == 2 and len(row["scores"]) == 2
        mask = read_mask(tmp_path / "label" / row["mask"])
        assert set(np.unique(mask)) <= {0, 3, 7}
    assert back["backend"].tolist() == ["grounded_sam"] * 3


def test_missing_local_directory(tmp_path):
    params = GroundedSamParams(detector_checkpoint=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(BackendError, match="detector_checkpoint: .*nope does not exist"):
        LABELERS.build("grounded_sam", LabelParams(backend="grounded_sam", grounded_sam=params))


def test_uncached_hub_id_offline(model_dirs):
    params = GroundedSamParams(detector_checkpoint="nobody/no-such-detector", device="cpu")
    with pytest.raises(BackendError, match="not in the local Hugging Face cache"):
        GroundedSamLabeler(params)


def test_wrong_model_type(model_dirs):
    det, _ = model_dirs
    params = GroundedSamParams(detector_checkpoint=str(det), sam_checkpoint=str(det), device="cpu")
    with pytest.raises(BackendError, match="sam_checkpoint: .* is a 'grounding-dino' model"):
        GroundedSamLabeler(params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(model_dirs):
    with pytest.raises(BackendError, match="CUDA is not available"):
        GroundedSamLabeler(_params(model_dirs).model_copy(update={"device": "cuda"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_gpu_in_half_precision(model_dirs):
    lab = GroundedSamLabeler(_params(model_dirs).model_copy(update={"device": "cuda"}))
    assert lab.dtype in (torch.bfloat16, torch.float16)
    results = lab.label([_pair(True, False), _pair(True, True)], ignore=255)
    assert all(r.mask.shape == (96, 128) for r in results)


# --------------------------------------------------------------------------------------------
# device-side preprocessing matches the processors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 128), (300, 200)])  # upsampled, downsampled
def test_preprocessing_matches_the_image_processors(model_dirs, shape):
    from transformers import AutoProcessor

    det_dir, seg_dir = model_dirs
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
    image = np.kron(small, np.ones((8, 8, 1), np.uint8))
    other = image[: shape[0] // 2]  # a second, smaller image: padding and pixel mask
    det_proc = AutoProcessor.from_pretrained(det_dir).image_processor
    ref = det_proc(images=[image, other], return_tensors="pt")
    pixels, mask = detector_pixels([image, other], det_proc, "cpu", torch.float32)
    assert pixels.shape == ref["pixel_values"].shape
    assert torch.equal(mask, ref["pixel_mask"].long())
    diff = (pixels - ref["pixel_values"]).abs()
    assert diff.max() < 0.018  # within one grey level (1 / 255 / std = 0.0175): PIL rounds

    seg_proc = AutoProcessor.from_pretrained(seg_dir).image_processor
    ref = seg_proc(images=[image, other], return_tensors="pt")
    pixels, sizes = segmenter_pixels([image, other], seg_proc, "cpu", torch.float32)
    assert pixels.shape == ref["pixel_values"].shape
    assert [tuple(s) for s in ref["reshaped_input_sizes"].tolist()] == sizes
    diff = (pixels - ref["pixel_values"]).abs()
    assert diff.max() < 0.018


def test_stage_metrics_and_filter_reasons_from_scripted_detections(labeler, tmp_path):
    from magicseg.core.config import FilterParams
    from magicseg.filter import run_filter

    gen = tmp_path / "generate"
    rows = []
    for i, (in_pos, in_cf) in enumerate([(True, False), (False, False), (True, True)]):
        pair = _pair(in_pos, in_cf)
        write_image(gen / f"p{i}.png", pair.positive)
        write_image(gen / f"c{i}.png", pair.counterfactual)
        rows.append(
            {
                "id": f"s{i}",
                "prompt": "p",
                "class_ids": [7],
                "class_names": ["owl"],
                "image": f"p{i}.png",
                "cf_image": f"c{i}.png",
                "oracle_mask": None,
            }
        )
    write_manifest(gen, pd.DataFrame(rows))
    params = LabelParams(backend="grounded_sam", grounded_sam=labeler.params)
    run_label(gen, tmp_path / "label", params, 10, tmp_path / "label.json", labeler=labeler)
    metrics = json.loads((tmp_path / "label.json").read_text())
    assert metrics["no_detection"] == 1 and metrics["cf_detected"] == 1
    assert metrics["mean_detections"] == pytest.approx(2 / 3, abs=1e-4)

    run_filter(tmp_path / "label", tmp_path / "filter", FilterParams(), tmp_path / "filter.json")
    decisions = pd.read_parquet(tmp_path / "filter" / "decisions.parquet")
    assert decisions["reasons"].iloc[1].tolist()[0] == "no_detection"
    assert "cf_detected" in decisions["reasons"].iloc[2].tolist()
    assert "cf_detected" not in decisions["reasons"].iloc[0].tolist()
    counts = json.loads((tmp_path / "filter.json").read_text())["flagged"]
    assert counts["no_detection"] == 1 and counts["cf_detected"] == 1
