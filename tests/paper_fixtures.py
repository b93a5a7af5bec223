"""Stand-ins for the paper profile's four models, built from configs in the test (no hub):
a tiny random Stable Diffusion, Grounding DINO, SAM and CLIP saved like hub checkpoints.

Random weights detect everything everywhere (sigmoid scores of 0.99999 in the positive and the
counterfactual alike) and SAM paints random lattices, so the paper's filter would drop every
sample (``cf_detected``, ``area_too_large``, ``too_many_components``) and ``train`` would have
nothing to learn from. Two small edits, on top of random weights, give the filter something
to keep while every model still runs its real forward:

- Grounding DINO (:func:`steer_detector`): the last text-enhancer LayerNorm outputs one fixed
  unit vector ``e`` for every token, and the decoder's output LayerNorm subtracts ``c e``, so a
  query's logit is ``x . e - c`` for its normalised state ``x``: still a random function of the
  image, now centred on the box threshold. ``c`` is set from the detector's scores on a few
  Stable Diffusion pairs of other prompts and seeds (the median crosses the threshold), so
  about half the images have a detection, positives and counterfactuals alike.
- SAM (:func:`sieve_sam`): the mask head's upscaling turned into a fixed pattern (a 32x32 grid
  with a hole in every other row and column) and its hypernetwork's last layer into a
  constant, so every mask is the same sieve: one component, 75% of the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tests.real_dataset_fixtures import COCO_IDS, box_mask, rle, scene, write_json
from tests.tiny_clip import tiny_clip_dir
from tests.tiny_grounded_sam import build_grounding_dino, build_sam
from tests.tiny_models import tiny_sd_pipeline_dir

CALIBRATION_PROMPTS = (
    ("cat", "a grey cat on a sofa next to a window"),
    ("bicycle", "a red bicycle leaning on a brick wall at noon"),
    ("teapot", "a white teapot on a wooden kitchen table"),
    ("kite", "a yellow kite above a sandy beach"),
    ("lamp", "a tall lamp in a dim living room"),
    ("boat", "a small boat on a calm lake in the fog"),
)


def sieve_sam(model) -> None:
    """Every mask of ``model`` (a tiny SamModel) the same sieve (see the module docstring)."""
    import torch

    dec = model.mask_decoder
    with torch.no_grad():
        c1 = dec.upscale_conv1.out_channels
        dec.upscale_conv1.weight.zero_()  # a constant map: +1/-1 channels after the LayerNorm
        dec.upscale_conv1.bias.copy_(torch.tensor([1.0, -1.0] * (c1 // 2)))
        dec.upscale_layer_norm.weight.fill_(1.0)
        dec.upscale_layer_norm.bias.zero_()
        conv2 = dec.upscale_conv2
        conv2.weight.zero_()
        conv2.bias.zero_()
        conv2.bias[0] = 1.0  # channel 0: GELU(1) everywhere
        conv2.weight[0, 1, 0, 0] = 3.5  # channel 1: only at one of the 2x2 kernel positions
        head = dec.output_hypernetworks_mlps[0].proj_out
        head.weight.zero_()
        head.bias.zero_()
        head.bias[0], head.bias[1] = 1.0, -1.0  # mask = U0 - U1: on, but for the holes


def detector_logit(model, proc, image: np.ndarray, name: str) -> float:
    """The largest logit of any query for ``name``'s tokens in ``image`` (HWC uint8), as the
    labeler computes it."""
    import torch

    from magicseg.label.grounded_sam import build_captions, detector_pixels

    (cap,) = build_captions([name], proc.tokenizer, model.config.max_text_len)
    pixels, mask = detector_pixels([image], proc.image_processor, "cpu", torch.float32)
    ids = torch.tensor([cap.input_ids])
    with torch.inference_mode():
        out = model(
            pixel_values=pixels,
            pixel_mask=mask,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
        )
    (a, b) = cap.spans[0]
    return float(out.logits[0, :, a:b].max())


def steer_detector(model, proc, images: list[tuple[np.ndarray, str]], threshold: float) -> float:
    """Centre ``model``'s scores on ``threshold`` over ``images`` ((HWC uint8, class name)
    pairs; see the module docstring); returns the offset ``c``."""
    import torch

    g = torch.Generator().manual_seed(0)
    e = torch.randn(model.config.d_model, generator=g)
    e /= e.norm()
    with torch.no_grad():
        text_ln = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        text_ln.weight.zero_()
        text_ln.bias.copy_(e)
        out_ln = model.model.decoder.layer_norm
        out_ln.bias.zero_()
        z = np.median([detector_logit(model, proc, im, name) for im, name in images])
        c = float(z - np.log(threshold / (1 - threshold)))
        out_ln.bias.copy_(-c * e)
    return c


def calibration_pairs(
    sd_dir: Path, size: int, steps: int, scheduler: str = "default"
) -> list[tuple[np.ndarray, str]]:
    """Positives and counterfactuals of :data:`CALIBRATION_PROMPTS` from the tiny Stable
    Diffusion, made by the pipeline's own generator (seeds unlike the pipeline's)."""
    from magicseg.core.config import GenerateParams
    from magicseg.generate.base import PromptRecord
    from magicseg.generate.diffusers import DiffusersPairGenerator
    from magicseg.prompts.counterfactual import make_counterfactual

    params = GenerateParams(
        backend="diffusers",
        height=size,
        width=size,
        diffusers={
            "checkpoint": str(sd_dir),
            "steps": steps,
            "scheduler": scheduler,
            "device": "cpu",
        },  # fmt: skip
    )
    records = [
        PromptRecord(f"c{i}", text, make_counterfactual(text, [name]), (1,), (name,), 7 + i)
        for i, (name, text) in enumerate(CALIBRATION_PROMPTS)
    ]
    pairs = DiffusersPairGenerator(params).generate(records)
    return [(im, r.class_names[0]) for r, p in zip(records, pairs, strict=True)
            for im in (p.positive, p.counterfactual)]  # fmt: skip


def paper_models(
    root: Path, size: int, steps: int, box_threshold: float, scheduler: str = "default"
) -> dict[str, Path]:
    """The four stand-ins saved under ``root``: ``sd`` (a diffusers pipeline directory),
    ``detector`` and ``sam`` (steered and sieved, with their processors), ``clip``. The
    detector is steered on images made as the pipeline will make them (``size``, ``steps``,
    ``scheduler``) and centred on ``box_threshold``."""
    import torch

    root = Path(root)
    sd = tiny_sd_pipeline_dir(root)
    torch.manual_seed(0)
    det_model, det_proc = build_grounding_dino("tiny")
    images = calibration_pairs(sd, size, steps, scheduler)
    steer_detector(det_model, det_proc, images, box_threshold)
    sam_model, sam_proc = build_sam("tiny")
    sieve_sam(sam_model)
    out = {"sd": sd, "detector": root / "gdino", "sam": root / "sam"}
    for (model, proc), path in (((det_model, det_proc), out["detector"]), ((sam_model, sam_proc), out["sam"])):  # fmt: skip
        model.save_pretrained(path)
        proc.save_pretrained(path)
    out["clip"] = tiny_clip_dir(root, image_size=32, patch=8)
    return out


def make_coco(root: Path, size: tuple[int, int] = (40, 48)) -> Path:
    """``coco`` in the COCO 2017 layout (annotations/instances_val2017.json, val2017/*.jpg) with
    the 80 categories and two images: a person and a dog, and a car."""
    from PIL import Image

    coco = root / "coco"
    h, w = size
    images, anns = [], []
    for k, objects in enumerate([[(1, 0, 30, 0, 24), (18, 10, 20, 26, 40)], [(3, 5, 35, 8, 40)]]):
        info = {"id": k + 1, "file_name": f"{k + 1:012d}.jpg", "height": h, "width": w}
        images.append(info)
        path = coco / "val2017" / info["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(h, w, 20 + k)).save(path, quality=95)
        for cat, y0, y1, x0, x1 in objects:
            m = box_mask(h, w, y0, y1, x0, x1)
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cat,
                         "segmentation": rle(m), "area": float(m.sum()), "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})  # fmt: skip
    from magicseg.core.vocabulary import builtin_names

    cats = [{"id": i, "name": n} for i, n in zip(COCO_IDS, builtin_names("coco"), strict=True)]
    write_json(
        coco / "annotations" / "instances_val2017.json",
        {"images": images, "annotations": anns, "categories": cats},
    )
    return coco
