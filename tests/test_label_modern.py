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
