"""Modern labelers on tiny random models loaded through the real path (no hub, no torchvision):
MM-Grounding-DINO (LLMDet's class) as the detector, SAM 2.1 as the mask segmenter, SAM 3 as a
one-model labeler with its presence score as the counterfactual check."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from tests.tiny_grounded_sam import save_grounded_sam
from tests.tiny_labelers import save_mm_grounding_dino, save_sam2

from magicseg.core.config import GroundedSamParams
from magicseg.core.errors import BackendError
from magicseg.label.base import LabelInput
from magicseg.label.grounded_sam import (
    Detection,
    GroundedSamLabeler,
    read_resize_normalise,
    resized_pixels,
)

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("modern")
    gdino, sam = save_grounded_sam(root)
    return {
        "gdino": gdino,
        "sam": sam,
        "mm_gdino": save_mm_grounding_dino(root),
        "sam2": save_sam2(root),
    }


def _image(shape=(96, 128), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


def _pil_reference(image: np.ndarray, proc) -> torch.Tensor:
    """The processors' recipe with PIL: bilinear resize to ``proc.size``, rescale, normalise."""
    h, w = proc.size
    x = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR), np.float32)
    x = (x * proc.rescale_factor - np.array(proc.image_mean)) / np.array(proc.image_std)
    return torch.from_numpy(x).permute(2, 0, 1).float()


# --------------------------------------------------------------------------------------------
# detectors and segmenters by model type
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("det", "seg", "det_cls", "seg_cls"),
    [
        ("mm_gdino", "sam2", "MMGroundingDinoForObjectDetection", "Sam2Model"),
        ("mm_gdino", "sam", "MMGroundingDinoForObjectDetection", "SamModel"),
        ("gdino", "sam2", "GroundingDinoForObjectDetection", "Sam2Model"),
    ],
)
def test_model_classes_follow_the_checkpoints_model_type(dirs, det, seg, det_cls, seg_cls):
    params = GroundedSamParams(
        detector_checkpoint=str(dirs[det]),
        sam_checkpoint=str(dirs[seg]),
        device="cpu",
        box_threshold=0.0,
        text_threshold=0.0,
        max_detections=3,
    )
    lab = GroundedSamLabeler(params)
    assert type(lab.detector).__name__ == det_cls
    assert type(lab.segmenter).__name__ == seg_cls
    image = _image()
    item = LabelInput("a", image, image[::-1].copy(), (3, 7), ("school bus", "owl"))
    (res,) = lab.label([item], ignore=255)
    # thresholds 0: every query is a detection of one of the two classes; 3 kept after NMS
    assert res.mask.shape == image.shape[:2]
    assert set(np.unique(res.mask)) <= {0, 3, 7}
    assert 1 <= len(res.detections) <= 3
    assert {d["class_id"] for d in res.detections} <= {3, 7}
    assert (res.mask > 0).any()
    assert res.cf_detected is not None and len(res.cf_detected) == 2


def test_sam2_preprocessing_matches_the_processor_recipe(dirs):
    proc = read_resize_normalise(str(dirs["sam2"]), "label.grounded_sam.sam_checkpoint")
    assert proc.size == (128, 128)
    images = [_image((96, 128)), _image((300, 200), seed=1)]  # upsampled, downsampled
    pixels = resized_pixels(images, proc, "cpu", torch.float32)
    assert pixels.shape == (2, 3, 128, 128)
    for got, image in zip(pixels, images, strict=True):
        diff = (got - _pil_reference(image, proc)).abs()
        assert diff.max() < 0.02  # within one grey level (1 / 255 / 0.225 = 0.0174)


def test_sam2_masks_are_at_image_size_and_follow_the_box(dirs):
    params = GroundedSamParams(
        detector_checkpoint=str(dirs["mm_gdino"]), sam_checkpoint=str(dirs["sam2"]), device="cpu"
    )
    lab = GroundedSamLabeler(params)
    image = _image((96, 160))
    boxes = [Detection(3, 0.9, (0.0, 0.0, 80.0, 48.0)), Detection(7, 0.8, (80.0, 48.0, 160, 96))]
    (masks,) = lab.segment([image], [boxes])
    assert masks.shape == (2, 96, 160) and masks.dtype == bool
    # the same decoder call made by hand: boxes scaled per axis to the square input
    seg = lab.segmenter
    with torch.inference_mode():
        emb = seg.get_image_embeddings(resized_pixels([image], lab.seg_proc, "cpu", torch.float32))
        scaled = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [64.0, 64.0, 128.0, 128.0]]])
        low = seg(image_embeddings=emb, input_boxes=scaled, multimask_output=False).pred_masks
    full = torch.nn.functional.interpolate(low[0, :, :1], (96, 160), mode="bilinear") > 0
    assert np.array_equal(masks, full[:, 0].numpy())
    (none,) = lab.segment([image], [[]])
    assert none is None


def test_a_sam2_checkpoint_is_not_a_detector(dirs):
    params = GroundedSamParams(
        detector_checkpoint=str(dirs["sam2"]), sam_checkpoint=str(dirs["sam2"]), device="cpu"
    )
    with pytest.raises(
        BackendError,
        match="detector_checkpoint: .* is a 'sam2' model, expected 'grounding-dino' or "
        "'mm-grounding-dino'",
    ):
        GroundedSamLabeler(params)


def test_sam2_without_preprocessor_config_is_refused_in_one_line(dirs, tmp_path):
    import shutil

    bare = tmp_path / "sam2-bare"
    shutil.copytree(dirs["sam2"], bare)
    (bare / "preprocessor_config.json").unlink()
    params = GroundedSamParams(
        detector_checkpoint=str(dirs["mm_gdino"]), sam_checkpoint=str(bare), device="cpu"
    )
    with pytest.raises(BackendError, match="sam_checkpoint: .* no usable preprocessor_config"):
        GroundedSamLabeler(params)


# --------------------------------------------------------------------------------------------
# SAM 3: one model, text in, instances and presence out
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    from tests.tiny_labelers import save_sam3

    return save_sam3(tmp_path_factory.mktemp("sam3"))


def _sam3(sam3_dir, **kw):
    from magicseg.core.config import Sam3Params
    from magicseg.label.sam3 import Sam3Labeler

    base = {"checkpoint": str(sam3_dir), "accept_licence": True, "device": "cpu"}
    return Sam3Labeler(Sam3Params(**{**base, **kw}))


def _item(seed=0, shape=(96, 128)):
    image = _image(shape, seed)
    return LabelInput(f"s{seed}", image, image[::-1].copy(), (3, 7), ("school bus", "owl"))


def test_sam3_is_refused_without_the_licence_opt_in(sam3_dir):
    from magicseg.core.config import LabelParams, Sam3Params
    from magicseg.label import LABELERS

    params = LabelParams(backend="sam3", sam3=Sam3Params(checkpoint=str(sam3_dir)))
    with pytest.raises(BackendError) as err:
        LABELERS.build("sam3", params)
    msg = str(err.value)
    assert msg.startswith("label.sam3.accept_licence: ") and "SAM License" in msg
    assert "\n" not in msg


def test_sam3_checkpoint_of_another_model_type_is_refused(dirs):
    with pytest.raises(BackendError, match="label.sam3.checkpoint: .* is a 'sam2' model"):
        _sam3(dirs["sam2"])


def test_sam3_preprocessing_matches_the_processor_recipe(sam3_dir):
    lab = _sam3(sam3_dir)
    assert lab.proc.size == (112, 112) and lab.proc.image_mean == (0.5, 0.5, 0.5)
    images = [_image((96, 128)), _image((300, 200), seed=1)]
    pixels = resized_pixels(images, lab.proc, "cpu", torch.float32)
    for got, image in zip(pixels, images, strict=True):
        assert (got - _pil_reference(image, lab.proc)).abs().max() < 0.01  # 1 / 255 / 0.5


def test_sam3_labels_are_class_indexed_and_batch_invariant(sam3_dir):
    lab = _sam3(sam3_dir, score_threshold=0.0, max_detections=5, batch_size=4)
    items = [_item(0), _item(1, (64, 80)), _item(2)]
    results = lab.label(items, ignore=255)
    for item, res in zip(items, results, strict=True):
        assert res.mask.shape == item.positive.shape[:2]
        assert set(np.unique(res.mask)) <= {0, 3, 7}
        assert len(res.detections) == 5  # threshold 0: every query of both classes, best 5
        scores = [d["score"] for d in res.detections]
        assert scores == sorted(scores, reverse=True)
        assert res.scores == pytest.approx(
            [
                max([d["score"] for d in res.detections if d["class_id"] == c] or [0])
                for c in (3, 7)
            ],
            abs=1e-5,
        )
        assert len(res.meta["presence"]) == 2
    # one prompt per forward (each image embedding taken once per prompt) gives the same
    one = _sam3(sam3_dir, score_threshold=0.0, max_detections=5, batch_size=1)
    for a, b in zip(results, one.label(items, ignore=255), strict=True):
        assert np.array_equal(a.mask, b.mask)
        boxes_a = np.array([d["box"] for d in a.detections])
        assert np.allclose(boxes_a, [d["box"] for d in b.detections], atol=0.05)


class ScriptedPresence(torch.nn.Module):
    """The real tiny SAM 3 whose outputs are overridden per prompt: the class ``owl`` is
    present (presence and instance logits +4), every other class absent (-4)."""

    def __init__(self, model, owl_ids: list[int]):
        super().__init__()
        self.model, self.owl = model, torch.tensor(owl_ids)

    def get_vision_features(self, **kw):
        return self.model.get_vision_features(**kw)

    def forward(self, **kw):
        out = self.model(**kw)
        owl = (kw["input_ids"] == self.owl).all(dim=1)
        sign = torch.where(owl, 4.0, -4.0)
        out.presence_logits = sign[:, None].expand_as(out.presence_logits).clone()
        out.pred_logits = sign[:, None].expand_as(out.pred_logits).clone()
        return out


@pytest.mark.parametrize(("threshold", "expected"), [(0.5, [False, True]), (0.99, [False, False])])
def test_sam3_presence_on_the_counterfactual_is_the_check(sam3_dir, threshold, expected):
    lab = _sam3(sam3_dir, score_threshold=0.5, cf_presence_threshold=threshold)
    lab.model = ScriptedPresence(lab.model, lab._tokens("owl")[0])
    (res,) = lab.label([_item()], ignore=255)
    assert {d["class_id"] for d in res.detections} == {7}  # only the owl's instances
    assert res.scores[0] == 0.0 and res.scores[1] == pytest.approx(0.982**2, abs=1e-3)
    assert set(np.unique(res.mask)) <= {0, 7}
    assert res.meta["cf_presence"] == pytest.approx([0.018, 0.982], abs=1e-3)
    assert res.cf_detected == expected
    assert 0.0 <= res.cf_agreement <= 1.0


def test_sam3_without_instances_skips_the_counterfactual(sam3_dir):
    lab = _sam3(sam3_dir, score_threshold=1.0)
    (res,) = lab.label([_item()], ignore=255)
    assert res.detections == [] and not res.mask.any()
    assert res.meta["cf_checked"] is False and res.cf_detected == [False, False]
    off = _sam3(sam3_dir, score_threshold=1.0, cf_check=False)
    (res,) = off.label([_item()], ignore=255)
    assert res.cf_detected is None and res.cf_agreement is None


def test_modern_labelers_run_in_bfloat16(dirs, sam3_dir):
    """The precision a GPU gets by default (bf16), checked on the CPU: every model input is cast."""
    params = GroundedSamParams(
        detector_checkpoint=str(dirs["mm_gdino"]),
        sam_checkpoint=str(dirs["sam2"]),
        device="cpu",
        dtype="bfloat16",
        box_threshold=0.0,
        text_threshold=0.0,
        max_detections=2,
    )
    lab = GroundedSamLabeler(params)
    assert lab.segmenter.dtype == torch.bfloat16
    (res,) = lab.label([_item()], ignore=255)
    assert res.mask.shape == (96, 128) and len(res.detections) == 2
    s3 = _sam3(sam3_dir, dtype="bfloat16", score_threshold=0.0, max_detections=2)
    assert s3.model.dtype == torch.bfloat16
    (res,) = s3.label([_item()], ignore=255)
    assert res.mask.shape == (96, 128) and len(res.detections) == 2
