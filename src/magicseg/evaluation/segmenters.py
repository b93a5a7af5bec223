"""The one segmenter interface evaluate scores, and its two implementations.

A :class:`Segmenter` is told the class names once (``set_classes``) and turns HWC uint8
images into, per image, two HxW int64 label maps: *with background* (0 = background, ``k`` =
the ``k``-th name) and *foreground only* (every pixel one of 1..K, for test sets that do not
score background).

- ``trained`` (``evaluate.segmenter``): a magicseg checkpoint through
  :class:`magicseg.inference.SlidingPredictor`; the procedural test set is scored at the
  checkpoint's training size in batches, the real datasets with the sliding-window protocol of
  ``params.evaluate`` (short side, window, stride, templates).
- ``grounded_sam``: the ``label.grounded_sam`` labeler used directly as a zero-shot segmenter:
  caption = the class names (split into captions under the detector's token limit by
  :func:`magicseg.label.grounded_sam.build_captions`), boxes -> SAM masks -> a class map
  (overlaps by score), background where nothing was detected; images go in at their own size.
  Its two maps are the same (an undetected pixel is a miss where background is not scored).
- ``sam3``: the ``label.sam3`` labeler the same way: every class name a text prompt of SAM 3,
  its instances above ``score_threshold`` composed by score, background where none is. The
  labeler's own score on the benchmarks: the ceiling a distilled segmenter can approach.
  SAM 3 runs one prompt per (image, class), so its cost grows with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from magicseg.core.config import EvaluateParams, GroundedSamParams, Sam3Params
from magicseg.core.devices import resolve_device
from magicseg.core.errors import BackendError
from magicseg.core.vocabulary import display_name

Labels = tuple[torch.Tensor, torch.Tensor]
"""(with background, foreground only): two HxW int64 label maps of one image."""


class Segmenter(Protocol):
    """See the module docstring."""

    def set_classes(self, names: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """``templates``: the text encoder's templates for these names (None: the default)."""

    def segment(self, images: Sequence[np.ndarray]) -> list[Labels]: ...


class GroundedSamSegmenter:
    """The Grounded-SAM labeler (anything with its ``detect``/``segment``) as a segmenter."""

    def __init__(self, labeler) -> None:
        self.labeler = labeler
        self.ids: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()

    def set_classes(self, names: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """``templates`` do not apply: the detector's caption is the names themselves."""
        self.ids = tuple(range(1, len(names) + 1))
        self.names = tuple(display_name(n) for n in names)

    def segment(self, images: Sequence[np.ndarray]) -> list[Labels]:
        from magicseg.label.grounded_sam import compose_mask

        images = list(images)
        dets = self.labeler.detect(images, [(self.ids, self.names)] * len(images))
        found = [i for i, d in enumerate(dets) if d]
        masks = self.labeler.segment([images[i] for i in found], [dets[i] for i in found])
        out = []
        by_image = dict(zip(found, masks, strict=True))
        for i, image in enumerate(images):
            if i in by_image:
                d = dets[i]
                mask = compose_mask(by_image[i], [x.class_id for x in d], [x.score for x in d])
            else:
                mask = np.zeros(image.shape[:2], np.int64)
            label = torch.from_numpy(mask)
            out.append((label, label))
        return out


class Sam3Segmenter:
    """The SAM 3 labeler (anything with its ``predict``) as a segmenter."""

    def __init__(self, labeler) -> None:
        self.labeler = labeler
        self.ids: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()

    def set_classes(self, names: Sequence[str]) -> None:
        self.ids = tuple(range(1, len(names) + 1))
        self.names = tuple(display_name(n) for n in names)

    def segment(self, images: Sequence[np.ndarray]) -> list[Labels]:
        from magicseg.label.grounded_sam import compose_mask

        images = list(images)
        preds = self.labeler.predict(images, [(self.ids, self.names)] * len(images))
        out = []
        for image, pred in zip(images, preds, strict=True):
            d = pred.detections
            if d:
                mask = compose_mask(pred.masks, [x.class_id for x in d], [x.score for x in d])
            else:
                mask = np.zeros(image.shape[:2], np.int64)
            label = torch.from_numpy(mask)
            out.append((label, label))
        return out


@dataclass
class Segmenters:
    """The segmenter of each protocol: ``procedural`` (test set at the training size) and
    ``real`` (real datasets); ``name`` is ``evaluate.segmenter``; ``checkpoint`` the loaded
    checkpoint of a trained segmenter (None for Grounded-SAM)."""

    name: str
    procedural: Segmenter
    real: Segmenter
    checkpoint: object | None = None


def build_segmenters(
    params: EvaluateParams,
    checkpoint: str | Path | None = None,
    grounded_sam: GroundedSamParams | None = None,
    text_encoder=None,
    sam3: Sam3Params | None = None,
) -> Segmenters:
    """The segmenters of ``params.segmenter``: ``trained`` loads ``checkpoint`` once (both
    protocols share it); ``grounded_sam`` and ``sam3`` build the labeler of their block (the
    ``label.grounded_sam`` / ``label.sam3`` params). ``text_encoder`` overrides the
    checkpoint's (tests)."""
    if params.segmenter == "sam3":
        if sam3 is None:
            raise BackendError("evaluate.segmenter: sam3 needs the label.sam3 block")
        from magicseg.label.sam3 import Sam3Labeler

        seg = Sam3Segmenter(Sam3Labeler(sam3))
        return Segmenters("sam3", seg, seg)
    if params.segmenter == "grounded_sam":
        if grounded_sam is None:
            raise BackendError(
                "evaluate.segmenter: grounded_sam needs the label.grounded_sam block"
            )
        from magicseg.label.grounded_sam import GroundedSamLabeler

        seg = GroundedSamSegmenter(GroundedSamLabeler(grounded_sam))
        return Segmenters("grounded_sam", seg, seg)
    if checkpoint is None:
        raise BackendError("evaluate.segmenter: trained needs a checkpoint path")
    from magicseg.inference import Predictor, SlidingPredictor
    from magicseg.model import load_checkpoint

    ckpt = load_checkpoint(checkpoint, text_encoder=text_encoder)
    predictor = Predictor(ckpt, device=resolve_device("auto", "evaluate"))
    procedural = SlidingPredictor(
        predictor, bg_threshold=params.bg_threshold, batch_size=params.batch_size
    )
    real = SlidingPredictor(
        predictor,
        params.short_side,
        params.window,
        params.stride,
        params.bg_threshold,
        params.templates,
    )
    return Segmenters("trained", procedural, real, ckpt)
