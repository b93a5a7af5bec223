"""Grounded-SAM labeler: Grounding DINO boxes per class name, SAM masks per box.

Pure PyTorch through ``transformers``; no CUDA extension. The model classes follow each
checkpoint's ``config.model_type`` (:data:`DETECTOR_TYPES`, :data:`SEGMENTER_TYPES`): Grounding
DINO or MM-Grounding-DINO (LLMDet checkpoints are MM-Grounding-DINO models) as the detector,
SAM or SAM 2.1 as the mask segmenter. SAM 2's image processor needs torchvision, so its
preprocessing is done here from its ``preprocessor_config.json`` (:func:`sam2_pixels`).
Differences from the official Grounded-SAM demo:

- the caption is the sample's class names (``"school bus. owl."``) and every box keeps the
  class whose tokens it matched (token spans, not decoded strings), so the mask is
  **class-indexed**; boxes go through per-class NMS and overlapping masks are resolved by score;
- batched: several (image, caption) pairs per Grounding DINO forward, one SAM embedding per
  image (batched encoder), all of an image's boxes decoded in one call; bf16/fp16 on GPU;
- the counterfactual check: the counterfactual image goes through the detector in the same
  batches; a class still found there is flagged (``cf_detected``), and the SAM foreground is
  compared with the counterfactual-difference foreground (``cf_agreement``, IoU).

Heavy imports (torch, transformers) happen inside functions and the labeler's constructor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from magicseg.core.config import DifferenceLabelerParams, GroundedSamParams
from magicseg.core.devices import resolve_device, resolve_dtype
from magicseg.core.errors import BackendError, ConfigError
from magicseg.label.base import LabelInput, LabelResult
from magicseg.label.difference import difference_foreground

if TYPE_CHECKING:
    import torch

DETECTOR_CLASSES = {
    "grounding-dino": "GroundingDinoForObjectDetection",
    "mm-grounding-dino": "MMGroundingDinoForObjectDetection",
}
"""``config.model_type`` -> the ``transformers`` class that loads it (LLMDet checkpoints are
``mm-grounding-dino``); both take the same inputs and give the same outputs."""
SEGMENTER_CLASSES = {"sam": "SamModel", "sam2": "Sam2Model"}
"""``config.model_type`` -> the ``transformers`` class (SAM 2.1 checkpoints are ``sam2``)."""
DETECTOR_TYPES = tuple(DETECTOR_CLASSES)
SEGMENTER_TYPES = tuple(SEGMENTER_CLASSES)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    """One box: ``class_id`` (vocabulary index, 1-based), ``score`` in [0, 1], ``box`` XYXY in
    pixels of the original image."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Caption:
    """A Grounding DINO caption for some of a sample's classes.

    ``positions``: which of the sample's classes (indices into ``class_ids``) it names;
    ``spans``: per such class, its token range ``[start, end)`` in ``input_ids``.
    """

    text: str
    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]


@dataclass
class Timings:
    """Seconds spent per part (synchronised on CUDA), accumulated over calls."""

    parts: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, part: str, device: str = "cpu") -> Iterator[None]:
        _sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.parts.clear()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Pure steps (tested with constructed inputs)
# --------------------------------------------------------------------------------------------
def build_captions(names: Sequence[str], tokenizer: Any, max_tokens: int) -> list[Caption]:
    """Captions ``"name one. name two."`` holding every name, each at most ``max_tokens``
    tokens with [CLS]/[SEP] (Grounding DINO's text limit, 256 for the released models).

    Names are packed greedily in order; a name whose tokens alone exceed the limit is a
    BackendError. Token spans are found in the caption's own tokenization, so they are exact.
    """
    pieces = [tokenizer(f"{n}.", add_special_tokens=False)["input_ids"] for n in names]
    groups: list[list[int]] = []
    length = 2  # [CLS] and [SEP]
    for i, ids in enumerate(pieces):
        if len(ids) + 2 > max_tokens:
            raise BackendError(
                f"class name {names[i]!r} is {len(ids)} tokens, over the detector's "
                f"{max_tokens}-token caption limit"
            )
        if not groups or length + len(ids) > max_tokens:
            groups.append([])
            length = 2
        groups[-1].append(i)
        length += len(ids)
    captions = []
    for group in groups:
        text = " ".join(f"{names[i]}." for i in group)
        ids = list(tokenizer(text)["input_ids"])
        spans, cursor = [], 1
        for i in group:
            name_ids = pieces[i][:-1]  # without the trailing "."
            start = _find(ids, name_ids, cursor)
            spans.append((start, start + len(name_ids)))
            cursor = start + len(name_ids)
        captions.append(Caption(text, tuple(ids), tuple(group), tuple(spans)))
    return captions


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    raise BackendError(f"tokenizer inconsistency: {sub} not found in caption tokens {seq}")


def match_classes(
    probs: np.ndarray,
    spans: Sequence[tuple[int, int]],
    box_threshold: float,
    text_threshold: float,
    box_score: str = "class",
) -> tuple[np.ndarray, np.ndarray]:
    """Phrase -> class for each query box.

    ``probs``: QxT token probabilities (sigmoid of Grounding DINO's logits) for one caption;
    ``spans``: per class, its token range. A box's class score is the max probability over the
    class's tokens; the box goes to the class with the highest score. ``box_score: class``:
    it is kept when that score is above both ``box_threshold`` and ``text_threshold``
    (separators and special tokens never decide a class); ``all`` (the published filter): when
    the max probability over all T tokens is above ``box_threshold``. Returns (span index per
    query, -1 when dropped; class score per query).
    """
    q = probs.shape[0]
    if not spans or q == 0:
        return np.full(q, -1, np.int64), np.zeros(q, np.float32)
    per_class = np.stack([probs[:, a:b].max(axis=1) for a, b in spans], axis=1)  # Q x C
    best = per_class.argmax(axis=1)
    score = per_class[np.arange(q), best].astype(np.float32)
    if box_score == "all":
        keep = probs.max(axis=1) > box_threshold
    elif box_score == "class":
        keep = (score > box_threshold) & (score > text_threshold)
    else:
        raise ConfigError(f"label.grounded_sam.box_score: unknown {box_score!r} (class, all)")
    return np.where(keep, best, -1), score


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of XYXY boxes, Nx4 by Mx4 -> NxM."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms_per_class(detections: Sequence[Detection], iou: float) -> list[Detection]:
    """Greedy NMS within each class (boxes of different classes never suppress each other);
    the result is sorted by descending score."""
    out: list[Detection] = []
    order = sorted(detections, key=lambda d: -d.score)
    for cid in dict.fromkeys(d.class_id for d in order):
        dets = [d for d in order if d.class_id == cid]
        boxes = np.array([d.box for d in dets], np.float64)
        ious = box_iou(boxes, boxes)
        alive = np.ones(len(dets), bool)
        for i in range(len(dets)):
            if alive[i]:
                out.append(dets[i])
                alive[i + 1 :] &= ious[i, i + 1 :] <= iou
    return sorted(out, key=lambda d: -d.score)


def compose_mask(
    masks: np.ndarray, class_ids: Sequence[int], scores: Sequence[float]
) -> np.ndarray:
    """Class-indexed HW int64 mask from NxHxW boolean masks: a pixel takes the class of the
    highest-scoring mask covering it, 0 where none does."""
    if len(masks) == 0:
        raise ValueError("compose_mask needs at least one mask (use zeros for no detection)")
    out = np.zeros(masks.shape[1:], np.int64)
    for i in np.argsort(np.asarray(scores, np.float64), kind="stable"):
        out[masks[i]] = class_ids[i]
    return out


def class_scores(detections: Sequence[Detection], class_ids: Sequence[int]) -> list[float]:
    """Per class of the sample, its best detection score (0.0 when not detected)."""
    best = {c: 0.0 for c in class_ids}
    for d in detections:
        best[d.class_id] = max(best.get(d.class_id, 0.0), d.score)
    return [float(best[c]) for c in class_ids]


def foreground_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean HW masks (1.0 when both are empty)."""
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------------------------
# Preprocessing on the model's device (the processors' recipe, without PIL on the CPU)
# --------------------------------------------------------------------------------------------
def _resized(image: np.ndarray, size: tuple[int, int], device: str) -> torch.Tensor:
    """HWC uint8 -> 1xCxhxw float in [0, 255] on ``device``, bilinearly resized (antialiased
    when shrinking, like PIL's BILINEAR)."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor(image, device=device).permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def _normalise(x: torch.Tensor, proc: Any) -> torch.Tensor:
    import torch

    x = x * proc.rescale_factor
    mean = torch.tensor(proc.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def detector_pixels(
    images: Sequence[np.ndarray], proc: Any, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding DINO inputs for HWC uint8 images, as its image processor makes them (shortest
    edge to ``size.shortest_edge`` capped by ``size.longest_edge``, rescale, normalise, pad
    bottom/right to the batch's largest): (BxCxHxW pixel values, BxHxW pixel mask)."""
    import torch
    from transformers.image_transforms import get_size_with_aspect_ratio

    shaped = []
    for image in images:
        size = get_size_with_aspect_ratio(
            image.shape[:2], proc.size.shortest_edge, proc.size.longest_edge
        )
        shaped.append(_normalise(_resized(image, tuple(size), device), proc))
    h = max(x.shape[-2] for x in shaped)
    w = max(x.shape[-1] for x in shaped)
    pixels = torch.zeros(len(shaped), 3, h, w, device=device)
    mask = torch.zeros(len(shaped), h, w, dtype=torch.long, device=device)
    for i, x in enumerate(shaped):
        pixels[i, :, : x.shape[-2], : x.shape[-1]] = x[0]
        mask[i, : x.shape[-2], : x.shape[-1]] = 1
    return pixels.to(dtype), mask


def segmenter_pixels(
    images: Sequence[np.ndarray], proc: Any, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """SAM inputs for HWC uint8 images, as its image processor makes them (longest edge to
    ``size.longest_edge``, rescale, normalise, pad to ``pad_size``): (BxCxHxW pixel values,
    resized (h, w) per image)."""
    import torch

    out = torch.zeros(len(images), 3, proc.pad_size.height, proc.pad_size.width, device=device)
    sizes = []
    for i, image in enumerate(images):
        size = tuple(proc._get_preprocess_shape(image.shape[:2], proc.size.longest_edge))
        x = _normalise(_resized(image, size, device), proc)
        out[i, :, : size[0], : size[1]] = x[0]
        sizes.append(size)
    return out.to(dtype), sizes


@dataclass(frozen=True)
class ResizeNormalise:
    """A square-resize image processor's recipe (SAM 2, SAM 3), read from its
    ``preprocessor_config.json`` without instantiating it (their processors need torchvision):
    ``size`` (height, width) the model input, then ``x * rescale_factor``, minus
    ``image_mean``, over ``image_std``."""

    size: tuple[int, int]
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def read_resize_normalise(source: str, name: str) -> ResizeNormalise:
    """:class:`ResizeNormalise` from ``preprocessor_config.json`` of a local directory or a
    (cached) hub id; a one-line BackendError naming ``name`` when it is missing or unusable."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(source, "preprocessor_config.json")
        cfg = json.loads(Path(path).read_text())
        size = cfg["size"]
        return ResizeNormalise(
            (int(size["height"]), int(size["width"])),
            float(cfg.get("rescale_factor", 1 / 255)),
            tuple(float(v) for v in cfg["image_mean"]),
            tuple(float(v) for v in cfg["image_std"]),
        )
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise BackendError(
            f"{name}: {source!r} has no usable preprocessor_config.json "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from None


def resized_pixels(
    images: Sequence[np.ndarray], proc: ResizeNormalise, device: str, dtype: torch.dtype
) -> torch.Tensor:
    """SAM 2 / SAM 3 inputs for HWC uint8 images, as their image processors make them (every
    image resized to ``proc.size`` whatever its aspect, antialiased bilinear, rescaled,
    normalised; no padding): BxCxHxW pixel values."""
    import torch

    return torch.cat([_normalise(_resized(im, proc.size, device), proc) for im in images]).to(dtype)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def check_source(
    key: str, source: str, expected: Sequence[str], block: str = "label.grounded_sam"
) -> str:
    """The loadable form of a hub id or local directory whose config is one of the
    ``expected`` model types; a one-line BackendError naming ``<block>.<key>``
    otherwise. :func:`magicseg.hub.check_model_source` first (path exists, id cached or the
    hub answers), then the config alone is read (no weights)."""
    from transformers import AutoConfig

    from magicseg.hub import check_model_source

    name = f"{block}.{key}"
    where = check_model_source(source, name)
    path = Path(source).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(path) if where == "local" else source)
    except (OSError, ValueError) as err:
        raise BackendError(
            f"{name}: cannot load {source!r} ({str(err).strip().splitlines()[0]})"
        ) from None
    if config.model_type not in expected:
        raise BackendError(
            f"{name}: {source!r} is a {config.model_type!r} model, expected "
            f"{' or '.join(repr(e) for e in expected)}"
        )
    return str(path) if where == "local" else source


def model_type(source: str) -> str:
    """``config.model_type`` of a checked source (:func:`check_source`), config only."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).model_type


def load_models(params: GroundedSamParams, device: str, dtype: torch.dtype) -> tuple:
    """(detector, detector processor, segmenter, segmenter processor), eval mode on device;
    the classes follow the checkpoints' model types. A SAM 2 segmenter's "processor" is its
    :class:`ResizeNormalise` recipe (its image processor needs torchvision)."""
    import transformers
    from transformers import AutoProcessor

    det_src = check_source("detector_checkpoint", params.detector_checkpoint, DETECTOR_TYPES)
    seg_src = check_source("sam_checkpoint", params.sam_checkpoint, SEGMENTER_TYPES)
    det_cls = getattr(transformers, DETECTOR_CLASSES[model_type(det_src)])
    seg_type = model_type(seg_src)
    seg_cls = getattr(transformers, SEGMENTER_CLASSES[seg_type])
    try:
        det = det_cls.from_pretrained(det_src, dtype=dtype)
        det_proc = AutoProcessor.from_pretrained(det_src)
        seg = seg_cls.from_pretrained(seg_src, dtype=dtype)
        if seg_type == "sam2":
            seg_proc = read_resize_normalise(seg_src, "label.grounded_sam.sam_checkpoint")
        else:
            seg_proc = AutoProcessor.from_pretrained(seg_src)
    except OSError as err:
        raise BackendError(
            f"label.grounded_sam: cannot load weights ({str(err).splitlines()[0]})"
        ) from None
    return det.to(device).eval(), det_proc, seg.to(device).eval(), seg_proc


# --------------------------------------------------------------------------------------------
# The labeler
# --------------------------------------------------------------------------------------------
class GroundedSamLabeler:
    """Grounding DINO + SAM, class-indexed, batched, with the counterfactual check."""

    name = "grounded_sam"

    def __init__(
        self,
        params: GroundedSamParams,
        difference: DifferenceLabelerParams | None = None,
        models: tuple | None = None,
    ) -> None:
        """``models``: an already loaded (detector, processor, segmenter, processor) tuple, to
        share weights between labelers (speed benchmarks); loaded from ``params`` otherwise."""
        import torch

        self.params = params
        self.difference = difference or DifferenceLabelerParams()
        self.device = str(resolve_device(params.device, "label.grounded_sam.device"))
        self.dtype = resolve_dtype(params.dtype, self.device, "label.grounded_sam.dtype")
        if models is None:
            models = load_models(params, self.device, self.dtype)
        self.detector, self.det_proc, self.segmenter, self.seg_proc = models
        self.max_tokens = int(self.detector.config.max_text_len)
        self.timings = Timings()
        self._captions: dict[tuple[str, ...], list[Caption]] = {}
        self._torch = torch

    # -- public ---------------------------------------------------------------------------
    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]:
        """Masks (HW int64 class indices), per-class scores, detections and the counterfactual
        check for each pair of ``batch`` (images HWC uint8 RGB)."""
        # 1. Detect on the positives, then on the counterfactuals of those with a detection
        #    (a sample without one is dropped anyway: no need to check its counterfactual).
        dets = self.detect(
            [it.positive for it in batch], [(it.class_ids, it.class_names) for it in batch]
        )
        checked = [i for i, d in enumerate(dets) if d] if self.params.cf_check else []
        cf_found = self.detect(
            [batch[i].counterfactual for i in checked],
            [(batch[i].class_ids, batch[i].class_names) for i in checked],
        )
        cf_dets: list[list[Detection]] = [[] for _ in batch]
        for i, found in zip(checked, cf_found, strict=True):
            cf_dets[i] = found

        # 2. Segment every box of the positives: one SAM embedding per image.
        masks = self.segment([it.positive for it in batch], dets)

        # 3. Compose class-indexed masks; scores; the counterfactual check.
        out = []
        for i, item in enumerate(batch):
            h, w = item.positive.shape[:2]
            if dets[i]:
                mask = compose_mask(
                    masks[i], [d.class_id for d in dets[i]], [d.score for d in dets[i]]
                )
            else:
                mask = np.zeros((h, w), np.int64)
            res = LabelResult(
                mask=mask,
                scores=class_scores(dets[i], item.class_ids),
                detections=[_as_row(d) for d in dets[i]],
                meta={},
            )
            if self.params.cf_check:
                with self.timings("cf_agreement"):
                    found_cf = {d.class_id for d in cf_dets[i]}
                    res.cf_detected = [c in found_cf for c in item.class_ids]
                    diff = difference_foreground(
                        item.positive, item.counterfactual, self.difference
                    )
                    res.cf_agreement = foreground_iou((mask > 0) & (mask != ignore), diff)
                    res.meta["cf_detections"] = [_as_row(d) for d in cf_dets[i]]
                    res.meta["cf_checked"] = bool(dets[i])  # skipped without a detection
            out.append(res)
        return out

    def detect(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[tuple[Sequence[int], Sequence[str]]],
    ) -> list[list[Detection]]:
        """Detections per image (HWC uint8), given each image's (class_ids, class_names);
        several (image, caption) pairs per forward, per-class NMS, sorted by score."""
        torch = self._torch
        jobs = []  # (image index, caption)
        for i, (_, names) in enumerate(classes):
            key = tuple(names)
            if key not in self._captions:
                self._captions[key] = build_captions(
                    names, self.det_proc.tokenizer, self.max_tokens
                )
            jobs += [(i, cap) for cap in self._captions[key]]
        raw: list[list[Detection]] = [[] for _ in images]
        bs = self.params.batch_size
        for start in range(0, len(jobs), bs):
            chunk = jobs[start : start + bs]
            with self.timings("detector_pre", self.device):
                pixels, pixel_mask = detector_pixels(
                    [images[i] for i, _ in chunk],
                    self.det_proc.image_processor,
                    self.device,
                    self.dtype,
                )
                ids, attn = _pad_ids([cap.input_ids for _, cap in chunk])
                inputs = {
                    "pixel_values": pixels,
                    "pixel_mask": pixel_mask,
                    "input_ids": ids.to(self.device),
                    "attention_mask": attn.to(self.device),
                    "token_type_ids": torch.zeros_like(ids).to(self.device),
                }
            with self.timings("detector", self.device), torch.inference_mode():
                out = self.detector(**inputs)
                probs = out.logits.float().sigmoid().cpu().numpy()  # B x Q x T
                boxes = out.pred_boxes.float().cpu().numpy()  # B x Q x 4, cxcywh in [0, 1]
            for b, (i, cap) in enumerate(chunk):
                cls, score = match_classes(
                    probs[b],
                    cap.spans,
                    self.params.box_threshold,
                    self.params.text_threshold,
                    self.params.box_score,
                )
                h, w = images[i].shape[:2]
                ids_i = classes[i][0]
                for q in np.flatnonzero(cls >= 0):
                    cx, cy, bw, bh = boxes[b, q]
                    xyxy = (
                        float(np.clip((cx - bw / 2) * w, 0, w)),
                        float(np.clip((cy - bh / 2) * h, 0, h)),
                        float(np.clip((cx + bw / 2) * w, 0, w)),
                        float(np.clip((cy + bh / 2) * h, 0, h)),
                    )
                    raw[i].append(
                        Detection(int(ids_i[cap.positions[cls[q]]]), float(score[q]), xyxy)
                    )
        return [nms_per_class(d, self.params.nms_iou)[: self.params.max_detections] for d in raw]

    def segment(
        self, images: Sequence[np.ndarray], detections: Sequence[Sequence[Detection]]
    ) -> list[np.ndarray | None]:
        """NxHxW boolean SAM masks per image (None for images without detections): encoder
        batched over images, all of an image's boxes decoded in one call."""
        if self.segmenter.config.model_type == "sam2":
            return self._segment_sam2(images, detections)
        torch = self._torch
        todo = [i for i, d in enumerate(detections) if d]
        out: list[np.ndarray | None] = [None] * len(images)
        bs = self.params.batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            with self.timings("sam_pre", self.device):
                pixel_values, sizes = segmenter_pixels(
                    [images[i] for i in chunk],
                    self.seg_proc.image_processor,
                    self.device,
                    self.dtype,
                )
            with self.timings("sam_encoder", self.device), torch.inference_mode():
                emb = self.segmenter.get_image_embeddings(pixel_values)
            for b, i in enumerate(chunk):
                h, w = images[i].shape[:2]
                nh, nw = sizes[b]
                scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
                boxes = np.array([d.box for d in detections[i]], np.float32) * scale
                with self.timings("sam_decoder", self.device), torch.inference_mode():
                    res = self.segmenter(
                        image_embeddings=emb[b : b + 1],
                        input_boxes=torch.from_numpy(boxes)[None].to(self.device),
                        multimask_output=False,
                    )
                    low = res.pred_masks[0, :, :1].float()  # N x 1 x h' x w'
                    full = self.seg_proc.image_processor.post_process_masks(
                        [low], [(h, w)], [(nh, nw)]
                    )[0]
                    out[i] = full[:, 0].cpu().numpy()
        return out

    def _segment_sam2(
        self, images: Sequence[np.ndarray], detections: Sequence[Sequence[Detection]]
    ) -> list[np.ndarray | None]:
        """:meth:`segment` for SAM 2.1: square inputs (boxes scaled per axis), multi-level
        image embeddings, low-resolution masks upsampled to the image and thresholded at 0."""
        torch = self._torch
        import torch.nn.functional as F

        proc: ResizeNormalise = self.seg_proc
        todo = [i for i, d in enumerate(detections) if d]
        out: list[np.ndarray | None] = [None] * len(images)
        bs = self.params.batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            with self.timings("sam_pre", self.device):
                pixel_values = resized_pixels(
                    [images[i] for i in chunk], proc, self.device, self.dtype
                )
            with self.timings("sam_encoder", self.device), torch.inference_mode():
                emb = self.segmenter.get_image_embeddings(pixel_values)
            for b, i in enumerate(chunk):
                h, w = images[i].shape[:2]
                nh, nw = proc.size
                scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
                boxes = np.array([d.box for d in detections[i]], np.float32) * scale
                with self.timings("sam_decoder", self.device), torch.inference_mode():
                    res = self.segmenter(
                        image_embeddings=[e[b : b + 1] for e in emb],
                        input_boxes=torch.from_numpy(boxes)[None].to(self.device),
                        multimask_output=False,
                    )
                    low = res.pred_masks[0, :, :1].float()  # N x 1 x h' x w'
                    full = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)
                    out[i] = (full[:, 0] > 0).cpu().numpy()
        return out


def _as_row(d: Detection) -> dict[str, Any]:
    return {"class_id": d.class_id, "score": round(d.score, 5), "box": [round(v, 2) for v in d.box]}


def _pad_ids(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    attn = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn
