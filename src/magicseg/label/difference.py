"""Model-free labelers: the counterfactual difference, and the renderer's oracle masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from magicseg.core.catalogue import paints_of
from magicseg.core.config import DifferenceLabelerParams
from magicseg.label.base import LabelInput, LabelResult


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius**2 + radius


def colour_corrected_residual(positive: np.ndarray, counterfactual: np.ndarray) -> np.ndarray:
    """|positive - f(counterfactual)| (max over RGB, HW float in [0, 1]) where f is the per-channel
    affine colour map fitted robustly (two passes, the second on the best-matching 60% of
    pixels), so a global colour/lighting drift is not mistaken for the object."""
    p = positive.reshape(-1, 3).astype(np.float32) / 255
    c = counterfactual.reshape(-1, 3).astype(np.float32) / 255
    keep = np.ones(len(p), bool)
    fitted = c
    for _ in range(2):
        fitted = np.empty_like(c)
        for ch in range(3):
            x, y = c[keep, ch], p[keep, ch]
            var = x.var()
            a = float(((x - x.mean()) * (y - y.mean())).mean() / var) if var > 1e-8 else 1.0
            a = float(np.clip(a, 0.5, 2.0))
            b = float(y.mean() - a * x.mean())
            fitted[:, ch] = a * c[:, ch] + b
        res = np.abs(p - fitted).max(axis=1)
        keep = res <= np.quantile(res, 0.6)
    res = np.abs(p - fitted).max(axis=1).reshape(positive.shape[:2])
    return ndimage.gaussian_filter(res, 0.7)


def difference_foreground(
    positive: np.ndarray, counterfactual: np.ndarray, params: DifferenceLabelerParams
) -> np.ndarray:
    """Boolean HW foreground: thresholded, opened, closed, small components removed."""
    fg = colour_corrected_residual(positive, counterfactual) > params.threshold
    if params.open_radius:
        fg = ndimage.binary_opening(fg, _disk(params.open_radius))
    if params.close_radius:
        fg = ndimage.binary_closing(fg, _disk(params.close_radius), border_value=0)
    if params.min_component:
        lab, n = ndimage.label(fg)
        if n:
            sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
            fg = np.isin(lab, 1 + np.flatnonzero(sizes >= params.min_component))
    return fg


SPLIT_SHARE = 0.2
"""A component whose runner-up class has at least this share of its pixels is taken for
touching objects of two classes and split pixel by pixel."""


def assign_classes(
    fg: np.ndarray,
    positive: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    ignore: int,
) -> np.ndarray:
    """Class-index mask (HW int64) from a foreground (HW bool) and the positive (HWC uint8).

    One class takes all the foreground. With several, each pixel is nearest in colour to one
    class (each class has the colours its name gives: the colour word, and the pattern shade
    of a striped or dotted catalogue class); each connected component goes to the class most
    of its pixels are nearest to, unless the runner-up has ``SPLIT_SHARE`` of them (two
    touching objects): then the component is split pixel by pixel, smoothed by a 3x3 majority.
    Classes of the same colour word, or without one, cannot be told apart: ``ignore``.
    """
    # 1. One class, or classes that colour cannot tell apart.
    mask = np.zeros(fg.shape, np.int64)
    if len(class_ids) == 1:
        mask[fg] = class_ids[0]
        return mask
    paints = [paints_of(n) or () for n in class_names]
    main = [p[0] if p else None for p in paints]
    if None in main or len(set(main)) < len(main):
        mask[fg] = ignore
        return mask

    # 2. Nearest class of every foreground pixel, under the scene's lighting (fitted).
    refs = np.array([rgb for p in paints for rgb in p], np.float32)
    owner = np.array([k for k, p in enumerate(paints) for _ in p])
    nearest = np.full(fg.shape, -1, np.int64)
    nearest[fg] = owner[_nearest_under_lighting(positive[fg].astype(np.float32), refs)]

    # 3. Components: the majority class, or split when two classes touch.
    ids = np.asarray(class_ids, np.int64)
    lab, n = ndimage.label(fg)
    for comp, box in enumerate(ndimage.find_objects(lab), start=1):
        sel = lab[box] == comp
        votes = np.bincount(nearest[box][sel], minlength=len(paints))
        first, second = np.argsort(votes)[::-1][:2]
        if votes[second] < SPLIT_SHARE * sel.sum():
            mask[box][sel] = ids[first]
            continue
        mask[box][sel] = ids[_split(nearest[box], sel, len(paints))[sel]]
    return mask


def _nearest_under_lighting(pixels: np.ndarray, refs: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Index of the nearest reference colour of each pixel (Nx3 float) among ``refs`` (Mx3),
    with the scene's lighting fitted: a per-channel gain and offset (tint, fog) that maps the
    references onto the pixels nearest them, alternated with the assignment a few times. The
    fit is pulled towards no change, so a sample that shows one colour keeps the plain rule."""
    gain, offset = np.ones(3, np.float32), np.zeros(3, np.float32)
    lam = 1000.0 * len(pixels)  # the prior's weight: a spread of about 32 levels per pixel
    for _ in range(rounds):
        seen = refs * gain + offset
        near = ((pixels[:, None, :] - seen[None]) ** 2).sum(-1).argmin(1)
        x = refs[near]
        for c in range(3):
            xc, yc = x[:, c], pixels[:, c]
            xm, ym = xc.mean(), yc.mean()
            var = ((xc - xm) ** 2).sum()
            cov = ((xc - xm) * (yc - ym)).sum()
            gain[c] = np.clip((cov + lam) / (var + lam), 0.5, 1.5)
            offset[c] = ym - gain[c] * xm
    seen = refs * gain + offset
    return ((pixels[:, None, :] - seen[None]) ** 2).sum(-1).argmin(1)


def _split(nearest: np.ndarray, sel: np.ndarray, k: int) -> np.ndarray:
    """Per-pixel classes (0..k-1, HW) of one component ``sel`` from each pixel's nearest class
    (``nearest``, HW): a 3x3 majority, then every piece of a class smaller than a tenth of that
    class's pixels (boundary pixels, shading) given to the class that surrounds it most."""
    onehot = np.stack([(nearest == c) & sel for c in range(k)]).astype(np.float32)
    out = np.stack([ndimage.uniform_filter(o, 3) for o in onehot]).argmax(0)
    for c in range(k):
        pieces, n = ndimage.label((out == c) & sel)
        if n < 2:
            continue
        sizes = ndimage.sum_labels(np.ones_like(pieces), pieces, np.arange(1, n + 1))
        for piece in np.flatnonzero(sizes < 0.1 * sizes.sum()) + 1:
            at = pieces == piece
            ring = ndimage.binary_dilation(at) & ~at & sel
            around = np.bincount(out[ring], minlength=k)
            around[c] = 0
            if around.any():
                out[at] = around.argmax()
    return out


class DifferenceLabeler:
    """Counterfactual-difference labeler: the object is where the pair differs."""

    name = "difference"

    def __init__(self, params: DifferenceLabelerParams) -> None:
        self.params = params

    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]:
        out = []
        for item in batch:
            fg = difference_foreground(item.positive, item.counterfactual, self.params)
            mask = assign_classes(fg, item.positive, item.class_ids, item.class_names, ignore)
            out.append(LabelResult(mask=mask, cf_agreement=1.0))
        return out


class OracleLabeler:
    """The generator's exact masks (upper bound; procedural generator only)."""

    name = "oracle"

    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]:
        out = []
        for item in batch:
            if item.oracle_mask is None:
                from magicseg.core.errors import DataError

                raise DataError(
                    f"sample {item.id} has no oracle mask: label.backend 'oracle' needs the "
                    "procedural generator"
                )
            out.append(LabelResult(mask=item.oracle_mask.astype(np.int64)))
        return out
