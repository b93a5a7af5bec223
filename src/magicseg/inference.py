"""Inference with a trained checkpoint on images of any size, and the Python API
``from magicseg.inference import predict``.

The protocol of the annotation-free open-vocabulary segmentation literature (mmseg's
``slide`` mode): the image is resized so its short side is ``short_side`` (bilinear), scored in
``window`` x ``window`` crops every ``stride`` pixels (the last crop of a row/column is moved
back inside the image; overlapping logits are averaged), and the logits are resized back to the
original size (bilinear) before the argmax.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from magicseg.core.devices import resolve_device
from magicseg.core.errors import DataError
from magicseg.core.io import read_image
from magicseg.model import Checkpoint, load_checkpoint
from magicseg.model.base import to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def resize_short_side(x: torch.Tensor, short_side: int | None) -> torch.Tensor:
    """Bx3xHxW float -> resized (bilinear) so that min(H, W) == ``short_side`` (None: as is)."""
    h, w = x.shape[-2:]
    if short_side is None or min(h, w) == short_side:
        return x
    scale = short_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Crop offsets along one axis (mmseg's ``slide_inference`` grid): every ``stride``, the
    last one moved back so it ends at ``size``; ``[0]`` when ``window >= size``."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + window, size) - window, 0) for i in range(n)})


def slide(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    window: int | None,
    stride: int | None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Bx3xHxW -> BxCxHxW: ``fn`` (Nx3xhxw -> NxCxhxw logits) on every window, overlapping
    logits averaged. ``window`` None (or covering the image): one call on the whole image.
    Every crop has the same shape (min(window, H), min(window, W)), so crops go through ``fn``
    ``batch_size`` at a time."""
    b, _, h, w = x.shape
    if window is None or (window >= h and window >= w):
        return fn(x)
    stride = stride or window
    boxes = [
        (y, x0) for y in window_starts(h, window, stride) for x0 in window_starts(w, window, stride)
    ]
    ch, cw = min(window, h), min(window, w)
    out: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        crops = torch.cat([x[..., y : y + ch, x0 : x0 + cw] for y, x0 in chunk])
        logits = fn(crops)
        if out is None:
            out = torch.zeros(b, logits.shape[1], h, w, device=logits.device, dtype=logits.dtype)
            count = count.to(logits.device)
        for i, (y, x0) in enumerate(chunk):
            out[..., y : y + ch, x0 : x0 + cw] += logits[i * b : (i + 1) * b]
            count[..., y : y + ch, x0 : x0 + cw] += 1
    return out / count


@torch.no_grad()
def labels_from_logits(
    logits: torch.Tensor,
    size: tuple[int, int],
    bg_threshold: float | None = None,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1x(1+K)xhxw logits -> (with background, foreground only), two HxW int64 label maps at
    ``size`` = (H, W) on the logits' device.

    The logits are resized (bilinear) ``chunk`` classes at a time (exact: the resize is per
    channel), so 1203 LVIS classes at full resolution never sit in memory at once.
    ``with background``: argmax over all, or, with ``bg_threshold``, the best foreground class
    where its softmax probability reaches the threshold and 0 elsewhere; ``foreground only``:
    argmax over classes 1..K (for test sets that do not score background).
    """
    c = logits.shape[1]
    best = best_fg = lse = arg = arg_fg = None
    for s in range(0, c, chunk):
        part = logits[:, s : s + chunk].float()
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        part = part[0]
        v, i = part.max(0)
        part_lse = part.logsumexp(0)
        if best is None:
            best, arg, lse = v, i, part_lse
        else:
            better = v > best  # ties keep the earlier class, as argmax does
            best, arg = torch.where(better, v, best), torch.where(better, i + s, arg)
            lse = torch.logaddexp(lse, part_lse)
        fg = part[1:] if s == 0 else part
        if fg.shape[0]:
            v, i = fg.max(0)
            i = i + (1 if s == 0 else s)
            if best_fg is None:
                best_fg, arg_fg = v, i
            else:
                better = v > best_fg
                best_fg, arg_fg = torch.where(better, v, best_fg), torch.where(better, i, arg_fg)
    if arg_fg is None:  # no foreground class at all
        arg_fg = torch.zeros_like(arg)
    if bg_threshold is not None:
        prob = (best_fg - lse).exp()
        arg = torch.where(prob >= bg_threshold, arg_fg, torch.zeros_like(arg_fg))
    return arg, arg_fg


class Predictor:
    """Scores every pixel of a batch against a set of class names with a loaded checkpoint.

    ``set_classes(names)`` encodes the names once; ``predict(images)`` returns Bx(1+K)xHxW
    logits (channel 0 = background, ``k`` = the ``k``-th name). Images of another size than
    the checkpoint's training size are resized to it and the logits resized back (bilinear).
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu") -> None:
        self.ckpt = checkpoint
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.names: list[str] = []
        self._features: torch.Tensor | None = None

    def set_classes(self, names: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """Encode the bare class names once (KxT text features) with the checkpoint's text
        encoder, which fills them into its own templates (the clip encoder: its training
        templates); ``templates`` ("a photo of a {}."), when given, replace the encoder's own
        (a class's features: the normalised mean over them), never wrap them."""
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise DataError("no class names given")
        self.names = names
        encoder = self.ckpt.text_encoder
        if templates is None:
            feats = encoder.encode(names)
        else:
            feats = encoder.encode(names, templates=tuple(templates))
        self._features = feats.float().to(self.device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        """Bx3xHxW float in [0, 1] -> Bx(1+K)xHxW float logits (CPU, or the model's device
        with ``to_cpu=False``)."""
        if self._features is None:
            raise DataError("set_classes() first")
        h, w = images.shape[-2:]
        x = images.to(self.device)
        th, tw = self.ckpt.image_size
        if (h, w) != (th, tw):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
        logits = self.model(x, self._features).logits
        if (h, w) != (th, tw):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.float().cpu() if to_cpu else logits.float()


class SlidingPredictor:
    """A :class:`Predictor` on images of any size (see the module docstring).

    ``segment(images)`` -> per image (with background, foreground only) HxW int64 labels at
    the image's size, on the predictor's device; images of one size go through the model
    ``batch_size`` at a time. ``__call__(image)`` is ``segment([image])[0]``.
    """

    def __init__(
        self,
        predictor: Predictor,
        short_side: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        bg_threshold: float | None = None,
        templates: Sequence[str] | None = None,
        batch_size: int = 1,
    ) -> None:
        self.predictor = predictor
        self.short_side = short_side
        self.window = window
        self.stride = stride
        self.bg_threshold = bg_threshold
        self.templates = None if templates is None else tuple(templates)
        self.batch_size = batch_size

    def set_classes(self, names: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """Bare names; ``templates`` (else this runner's, else the text encoder's own)."""
        self.predictor.set_classes(names, self.templates if templates is None else templates)

    def logits(self, images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """B HWC uint8 images of one size -> Bx(1+K)xhxw logits at the resized (short side)
        resolution."""
        x = to_tensor(images).to(self.predictor.device)
        x = resize_short_side(x, self.short_side)
        # crops per forward: at most 8, and ~1.5 GB of float32 logits (1 for LVIS at 448 px)
        per_crop = 4 * (1 + len(self.predictor.names)) * (self.window or 1) ** 2 * len(x)
        batch = max(1, min(8, int(1.5e9 // per_crop)))
        return slide(
            lambda crop: self.predictor.predict(crop, to_cpu=False),
            x,
            self.window,
            self.stride,
            batch,
        )

    def segment(
        self, images: Sequence[np.ndarray] | np.ndarray
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """HWC uint8 images (any sizes) -> per image (with background, foreground only)."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        while start < len(images):
            # a run of images of the first one's size, at most batch_size long
            size = images[start].shape[:2]
            end = start + 1
            while end < len(images) and end - start < self.batch_size:
                if images[end].shape[:2] != size:
                    break
                end += 1
            logits = self.logits(images[start:end])
            out += [
                labels_from_logits(logits[i : i + 1], size, self.bg_threshold)
                for i in range(end - start)
            ]
            start = end
        return out

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.segment([image])[0]


def expand_inputs(inputs: Sequence[str | Path] | str | Path) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and glob patterns (``**``
    allowed) -> image paths, in the given order, without duplicates; DataError when an entry
    matches nothing."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(entry)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            raise DataError(f"{entry}: cannot read image (no such file or folder)")
        if not found:
            raise DataError(f"{entry}: no images ({', '.join(IMAGE_SUFFIXES)})")
        out += [p for p in found if p not in out]
    return out


def predict(
    images: Sequence[str | Path | np.ndarray] | str | Path | np.ndarray,
    classes: Sequence[str] | str,
    checkpoint,
    *,
    short_side: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    bg_threshold: float | None = None,
    templates: Sequence[str] | None = None,
    device: str | None = None,
    text_encoder=None,
) -> list[np.ndarray]:
    """Segment ``images`` into ``classes``; one HxW int64 mask per image (0 = background,
    ``k`` = ``classes[k - 1]``) at the image's size.

    ``images``: HWC uint8 RGB arrays, image files, folders or glob patterns (expanded by
    :func:`expand_inputs`, masks in that order). ``classes``: names or "a,b,c".
    ``checkpoint``: a ``model.pt`` of any trained model, or a loaded
    :class:`magicseg.model.Checkpoint`. ``short_side``/``window``/``stride``: the sliding-window
    protocol for large images (None: the whole image at once). ``templates``: None = the
    checkpoint's text encoder's own (the clip model: its training templates), else they replace
    them. ``device``: default CUDA when available.
    """
    # 1. Inputs, checked before the model is loaded.
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    names = [n for n in names if n]
    if not names:
        raise DataError("predict: give at least one class name")
    if len(set(names)) != len(names):
        raise DataError("predict: duplicate class names")
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    images = list(images)  # a BxHxWx3 array becomes its images
    given = sum(isinstance(im, np.ndarray) for im in images)
    if 0 < given < len(images):
        raise DataError("predict: give either image arrays or paths, not both")
    arrays = images if given else [read_image(p) for p in expand_inputs(images)]

    # 2. Model and class features.
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else None
    ckpt = ckpt or load_checkpoint(checkpoint, text_encoder=text_encoder)
    runner = SlidingPredictor(
        Predictor(ckpt, device=resolve_device(device, "predict: device")),
        short_side,
        window,
        stride,
        bg_threshold,
        templates,
    )
    runner.set_classes(names)

    # 3. One image at a time (sizes may differ).
    return [runner(image)[0].cpu().numpy() for image in arrays]
