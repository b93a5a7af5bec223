"""Model-free labelers: the counterfactual difference, and the renderer's oracle masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from magicseg.core.catalogue import colour_of
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


def assign_classes(
    fg: np.ndarray,
    positive: np.ndarray,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    ignore: int,
) -> np.ndarray:
    """Class-index mask from a foreground: one class takes it all; with several, each connected
    component goes to the class whose name's colour word is nearest its mean colour; components
    that no colour word decides are ``ignore``."""
    mask = np.zeros(fg.shape, np.int64)
    if len(class_ids) == 1:
        mask[fg] = class_ids[0]
        return mask
    refs = [colour_of(n) for n in class_names]
    if any(r is None for r in refs) or len({tuple(r) for r in refs}) < len(refs):
        mask[fg] = ignore
        return mask
    refs_arr = np.array(refs, np.float32)
    lab, n = ndimage.label(fg)
    img = positive.astype(np.float32)
    for comp in range(1, n + 1):
        sel = lab == comp
        # per-pixel votes (stripes and shading make the mean colour unreliable)
        d = ((img[sel][:, None, :] - refs_arr[None]) ** 2).sum(-1)
        votes = np.bincount(d.argmin(1), minlength=len(refs))
        mask[sel] = class_ids[int(votes.argmax())]
    return mask


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
