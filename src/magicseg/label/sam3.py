"""SAM 3 labeler: one model, text in, instance masks and a presence score out.

``Sam3Model`` (``transformers``) is prompted with each class name of a sample separately (SAM 3
takes one noun phrase per prompt). Per (image, class) it gives Q instance queries (box, mask,
logit) and one *presence* logit ("is this concept in the image at all"); an instance's score
is ``sigmoid(logit) * sigmoid(presence)``, as in the processor's post-processing. The image
is encoded once and its embedding shared by all its class prompts.

- the mask is **class-indexed**: instances above ``score_threshold`` (at most
  ``max_detections`` per image, best first) are composed by score like Grounded-SAM's boxes;
- the counterfactual check is SAM 3's own presence score on the counterfactual image: a class
  whose presence there is above ``cf_presence_threshold`` is flagged (``cf_detected``); the
  foreground is also compared with the counterfactual-difference foreground
  (``cf_agreement``, IoU), as for Grounded-SAM;
- SAM 3's image processor needs torchvision: the preprocessing (square resize, rescale,
  normalise) is done here from its ``preprocessor_config.json``;
- the weights are gated under the SAM License: ``label.sam3.accept_licence`` must be true.

Heavy imports happen inside functions and the labeler's constructor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from magicseg.core.config import DifferenceLabelerParams, Sam3Params
from magicseg.core.devices import resolve_device, resolve_dtype
from magicseg.core.errors import BackendError
from magicseg.label.base import LabelInput, LabelResult
from magicseg.label.difference import difference_foreground
from magicseg.label.grounded_sam import (
    Detection,
    Timings,
    _as_row,
    check_source,
    class_scores,
    compose_mask,
    foreground_iou,
    read_resize_normalise,
    resized_pixels,
)

if TYPE_CHECKING:
    import torch

MODEL_TYPES = ("sam3",)
TEXT_LENGTH = 32
"""Tokens per class prompt (SAM 3's text tower and processor use 32)."""
LICENCE = (
    "label.sam3.accept_licence: SAM 3's weights are gated under the SAM License (not an "
    "open-source licence); accept it on the hub, then set label.sam3.accept_licence: true"
)


def check_licence(params: Sam3Params) -> None:
    """The one-line refusal of SAM 3 without ``accept_licence``."""
    if not params.accept_licence:
        raise BackendError(LICENCE)


@dataclass
class Prediction:
    """SAM 3 on one image for its classes: ``detections`` (best first, XYXY pixels),
    ``masks`` NxHxW boolean aligned with them (None when not asked for or nothing found),
    ``presence`` per class (aligned with the classes asked for), in [0, 1]."""

    detections: list[Detection]
    masks: np.ndarray | None
    presence: list[float]


def load_sam3(params: Sam3Params, device: str, dtype: torch.dtype) -> tuple:
    """(model, tokenizer, :class:`ResizeNormalise`), eval mode on device."""
    from transformers import AutoTokenizer, Sam3Model

    src = check_source("checkpoint", params.checkpoint, MODEL_TYPES, "label.sam3")
    proc = read_resize_normalise(src, "label.sam3.checkpoint")
    try:
        model = Sam3Model.from_pretrained(src, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except OSError as err:
        raise BackendError(
            f"label.sam3: cannot load weights ({str(err).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), tokenizer, proc


def _take(vision: Any, index: torch.Tensor) -> Any:
    """The image embeddings of ``index`` (one entry per prompt) from a batch's embeddings."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    return Sam3VisionEncoderOutput(
        fpn_hidden_states=tuple(t.index_select(0, index) for t in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(t.index_select(0, index) for t in vision.fpn_position_encoding),
    )


class Sam3Labeler:
    """SAM 3 alone, class-indexed, with its presence score as the counterfactual check."""

    name = "sam3"

    def __init__(
        self,
        params: Sam3Params,
        difference: DifferenceLabelerParams | None = None,
        models: tuple | None = None,
    ) -> None:
        """``models``: an already loaded (model, tokenizer, preprocessing) tuple, to share
        weights (benchmarks); loaded from ``params`` otherwise. The licence is checked first."""
        import torch

        check_licence(params)
        self.params = params
        self.difference = difference or DifferenceLabelerParams()
        self.device = str(resolve_device(params.device, "label.sam3.device"))
        self.dtype = resolve_dtype(params.dtype, self.device, "label.sam3.dtype")
        if models is None:
            models = load_sam3(params, self.device, self.dtype)
        self.model, self.tokenizer, self.proc = models
        self.timings = Timings()
        self._text: dict[str, tuple[list[int], list[int]]] = {}
        self._torch = torch

    # -- public ---------------------------------------------------------------------------
    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]:
        """Masks (HW int64 class indices), per-class scores, instances and the counterfactual
        check (presence on the counterfactual) for each pair of ``batch`` (HWC uint8 RGB)."""
        # 1. Instances on the positives; presence on the counterfactuals of those with one.
        classes = [(it.class_ids, it.class_names) for it in batch]
        preds = self.predict([it.positive for it in batch], classes)
        checked = [i for i, p in enumerate(preds) if p.detections] if self.params.cf_check else []
        cf_preds = self.predict(
            [batch[i].counterfactual for i in checked], [classes[i] for i in checked], False
        )
        cf_by_item = dict(zip(checked, cf_preds, strict=True))

        # 2. Class-indexed masks, scores, the counterfactual check.
        out = []
        for i, item in enumerate(batch):
            pred = preds[i]
            dets = pred.detections
            if dets:
                mask = compose_mask(pred.masks, [d.class_id for d in dets], [d.score for d in dets])
            else:
                mask = np.zeros(item.positive.shape[:2], np.int64)
            res = LabelResult(
                mask=mask,
                scores=class_scores(dets, item.class_ids),
                detections=[_as_row(d) for d in dets],
                meta={"presence": [round(p, 5) for p in pred.presence]},
            )
            if self.params.cf_check:
                with self.timings("cf_agreement"):
                    cf = cf_by_item.get(i)
                    presence = cf.presence if cf else [0.0] * len(item.class_ids)
                    res.cf_detected = [p > self.params.cf_presence_threshold for p in presence]
                    diff = difference_foreground(
                        item.positive, item.counterfactual, self.difference
                    )
                    res.cf_agreement = foreground_iou((mask > 0) & (mask != ignore), diff)
                    res.meta["cf_presence"] = [round(p, 5) for p in presence]
                    res.meta["cf_checked"] = cf is not None  # skipped without an instance
            out.append(res)
        return out

    def predict(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[tuple[Sequence[int], Sequence[str]]],
        masks: bool = True,
    ) -> list[Prediction]:
        """SAM 3 on HWC uint8 ``images``, each prompted with its (class_ids, class_names):
        instances above ``score_threshold`` (at most ``max_detections``, best first), their
        masks at image size (when ``masks``), and each class's presence score."""
        torch = self._torch
        import torch.nn.functional as F

        p = self.params
        found: list[list[tuple[Detection, torch.Tensor | None]]] = [[] for _ in images]
        presence: list[list[float]] = [[0.0] * len(c[0]) for c in classes]
        bs = p.batch_size
        for start in range(0, len(images), bs):
            idx = list(range(start, min(start + bs, len(images))))
            # 1. One image embedding per image of the chunk.
            with self.timings("sam3_pre", self.device):
                pixels = resized_pixels(
                    [images[i] for i in idx], self.proc, self.device, self.dtype
                )
            with self.timings("sam3_vision", self.device), torch.inference_mode():
                vision = self.model.get_vision_features(pixel_values=pixels)
            # 2. Every (image, class) prompt, ``batch_size`` per forward.
            jobs = [(b, k) for b, i in enumerate(idx) for k in range(len(classes[i][0]))]
            for js in range(0, len(jobs), bs):
                chunk = jobs[js : js + bs]
                ids, attn = zip(
                    *(self._tokens(classes[idx[b]][1][k]) for b, k in chunk), strict=True
                )
                which = torch.tensor([b for b, _ in chunk], device=self.device)
                with self.timings("sam3_prompts", self.device), torch.inference_mode():
                    out = self.model(
                        vision_embeds=_take(vision, which),
                        input_ids=torch.tensor(ids, device=self.device),
                        attention_mask=torch.tensor(attn, device=self.device),
                    )
                    pres = out.presence_logits.float().sigmoid()[:, 0].cpu()  # J
                    scores = out.pred_logits.float().sigmoid().cpu() * pres[:, None]  # J x Q
                    boxes = out.pred_boxes.float().clamp(0, 1).cpu()  # J x Q x 4, XYXY in [0, 1]
                for j, (b, k) in enumerate(chunk):
                    i = idx[b]
                    h, w = images[i].shape[:2]
                    presence[i][k] = float(pres[j])
                    keep = torch.nonzero(scores[j] > p.score_threshold).flatten()
                    if masks and len(keep):
                        with self.timings("sam3_masks", self.device):
                            logits = out.pred_masks[j, keep.to(self.device)].float()[
                                None
                            ]  # 1 x N x h' x w'
                            full = F.interpolate(logits, (h, w), mode="bilinear")[0]
                            inst = (full.sigmoid() > p.mask_threshold).cpu()
                    for n, q in enumerate(keep.tolist()):
                        x0, y0, x1, y1 = (boxes[j, q] * torch.tensor([w, h, w, h])).tolist()
                        det = Detection(
                            int(classes[i][0][k]), float(scores[j, q]), (x0, y0, x1, y1)
                        )
                        found[i].append((det, inst[n] if masks else None))

        out_preds = []
        for i in range(len(images)):
            best = sorted(found[i], key=lambda t: -t[0].score)[: p.max_detections]
            stacked = np.stack([m.numpy() for _, m in best]) if masks and best else None
            out_preds.append(Prediction([d for d, _ in best], stacked, presence[i]))
        return out_preds

    def _tokens(self, name: str) -> tuple[list[int], list[int]]:
        if name not in self._text:
            enc = self.tokenizer(
                name, padding="max_length", max_length=TEXT_LENGTH, truncation=True
            )
            self._text[name] = (list(enc["input_ids"]), list(enc["attention_mask"]))
        return self._text[name]
