"""An offline stand-in for Grounded-SAM: labels from the positive image alone, with its errors.

The paper labels each positive with Grounding DINO (boxes for the prompt's class words) and SAM
(a mask per box), never looking at the counterfactual; its Grounded-SAM baseline reaches 61.8
mIoU on VOC. This labeler does the same in the procedural world, on a CPU, fast:

1. **Perception** (the detector's and SAM's good case): a class is seen where the positive shows
   the colours its name gives (the colour word; a striped or dotted class's pattern shade next to
   it), under the scene's lighting, fitted as a per-channel gain and offset. Each connected piece
   is one detection (a box, a mask, a score). Classes of the same colour cannot be told apart:
   each such piece goes to one of them at random.
2. **Errors**, drawn per sample from its id (``label.grounded_proxy.seed``), never from the order:
   ``bleed`` (a mask grows into the background of a loosened box), ``miss`` (a part of the object
   is cut off along a random line), ``clutter`` (a salient background region, clutter or texture,
   segmented and taken for one of the classes), ``confusion`` (an object given another class of
   the prompt, more often the more words the two names share).
3. **Composition**: the masks painted in order of score (the best wins where they overlap).
4. **Counterfactual check** (``cf_check``), as the ``grounded_sam`` labeler does it: the classes
   are looked for in the counterfactual too (their colours, and every false detection whose
   region the counterfactual still shows unchanged: the same clutter fools the detector again),
   and the foreground is compared with the counterfactual difference (IoU).

Everything is vectorised numpy on 64 px images: hundreds of labels per second on one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from magicseg.core import seeding
from magicseg.core.catalogue import paints_of
from magicseg.core.config import DifferenceLabelerParams, GroundedProxyParams
from magicseg.core.errors import BackendError
from magicseg.label.base import LabelInput, LabelResult
from magicseg.label.difference import difference_foreground

MIN_PIECE = 8
"""Perceived pieces smaller than this many pixels are noise, not detections."""
MIN_CHROMA = 0.4
"""A pixel shows a class colour only if its chroma (max - min over RGB) is at least this share
of the colour's chroma under the fitted lighting."""
SHADE_REACH = 3
"""A pattern-shade pixel belongs to a class only this close (pixels) to its main colour."""
REGION_TOLERANCE = 36.0
"""RGB distance within which SAM's mask of a false box keeps pixels like the box's centre."""
SAME_REGION = 24.0
"""Median per-pixel difference (max over RGB) under which a region is unchanged in the
counterfactual."""


@dataclass
class Detection:
    """One detection: ``class_id`` (vocabulary index), ``score`` in [0, 1], ``mask`` HW bool,
    ``false``: a false detection (clutter), not an object of the class."""

    class_id: int
    score: float
    mask: np.ndarray
    false: bool = False

    def box(self) -> list[float]:
        """XYXY pixels of the mask's bounding box."""
        ys, xs = np.nonzero(self.mask)
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def class_paints(names: Sequence[str]) -> list[tuple[tuple[int, int, int], ...]]:
    """Each name's colours (main first); a BackendError for a name without a colour word."""
    out = []
    for name in names:
        paints = paints_of(name)
        if not paints:
            raise BackendError(
                f"label.backend 'grounded_proxy' sees classes by the colours their names give, "
                f"and {name!r} has none: use it with the procedural vocabulary, or another "
                "label.backend (difference, grounded_sam)"
            )
        out.append(paints)
    return out


def perceive(
    image: np.ndarray,
    paints: Sequence[Sequence[tuple[int, int, int]]],
    tolerance: float,
    lighting: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[list[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Per class, the pieces (HW bool masks) of the image (HWC uint8) that show its colours,
    and the lighting (per-channel gain and offset, two float32 3-vectors) they were seen under.

    Each pixel is matched to the nearest class colour under the ``lighting`` given, or one
    fitted here (three rounds, pulled towards no change); a pixel within ``tolerance`` (RGB
    distance) of it, and at least ``MIN_CHROMA`` as vivid, shows that colour. A pattern shade
    counts only within ``SHADE_REACH`` pixels of the class's main colour. Pieces: closed,
    connected, at least ``MIN_PIECE`` pixels.
    """
    # 1. Nearest colour of every pixel under the fitted lighting.
    h, w = image.shape[:2]
    px = image.reshape(-1, 3).astype(np.float32)
    refs = np.array([c for p in paints for c in p], np.float32)
    owner = np.array([k for k, p in enumerate(paints) for _ in p])
    is_main = np.array([j == 0 for p in paints for j in range(len(p))])
    gain, offset = np.ones(3, np.float32), np.zeros(3, np.float32)
    if lighting is not None:
        gain, offset = lighting
    sq = (px**2).sum(1)[:, None]
    for rnd in range(4):
        seen = refs * gain + offset
        d2 = sq - 2 * px @ seen.T + (seen**2).sum(1)[None]
        near = d2.argmin(1)
        hit = np.take_along_axis(d2, near[:, None], 1)[:, 0] < tolerance**2
        if rnd == 3 or hit.sum() < MIN_PIECE or lighting is not None:
            break
        x, y = refs[near[hit]], px[hit]
        lam = 1000.0 * len(x)  # the prior's weight: a spread of about 32 levels per pixel
        xm, ym = x.mean(0), y.mean(0)
        var = ((x - xm) ** 2).sum(0)
        cov = ((x - xm) * (y - ym)).sum(0)
        gain = np.clip((cov + lam) / (var + lam), 0.5, 1.5).astype(np.float32)
        offset = (ym - gain * xm).astype(np.float32)
    # a colour is seen only as vivid as it is painted (under the lighting): greys and muted
    # backgrounds near a dark colour are not it
    seen = refs * gain + offset
    chroma = px.max(1) - px.min(1)
    hit &= chroma >= MIN_CHROMA * (seen.max(1) - seen.min(1))[near]
    near, hit = near.reshape(h, w), hit.reshape(h, w)

    # 2. Per class: main colour, the pattern shade next to it, closed; its pieces.
    out = []
    for k in range(len(paints)):
        mine = hit & (owner[near] == k)
        main = mine & is_main[near]
        if main.sum() < MIN_PIECE:
            out.append([])
            continue
        if len(paints[k]) > 1:
            mine &= ndimage.binary_dilation(main, iterations=SHADE_REACH)
        m = ndimage.binary_closing(mine, border_value=0)
        lab, n = ndimage.label(m)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        out.append([lab == j for j in np.flatnonzero(sizes >= MIN_PIECE) if j])
    return out, (gain, offset)


def word_overlap(a: str, b: str) -> float:
    """Shared words over all words of two names (Jaccard): "red heart", "red star" -> 1/3."""
    wa, wb = set(a.lower().split()), set(b.lower().split())
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def _loosened_box(mask: np.ndarray, grow: float) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = int(np.ceil(grow * (y1 - y0))), int(np.ceil(grow * (x1 - x0)))
    h, w = mask.shape
    return slice(max(0, y0 - dy), min(h, y1 + dy)), slice(max(0, x0 - dx), min(w, x1 + dx))


def bleed(mask: np.ndarray, image: np.ndarray, grow: float) -> np.ndarray:
    """The mask grown into its box loosened by ``grow`` of its size on each side: every pixel of
    that box that looks like the box's background (within ``2 * REGION_TOLERANCE`` of its
    median colour outside the mask), as SAM does given a loose box on a busy background."""
    sy, sx = _loosened_box(mask, grow)
    crop = image[sy, sx].astype(np.float32)
    outside = ~mask[sy, sx]
    if not outside.any():
        return mask
    ref = np.median(crop[outside], axis=0)
    like = np.abs(crop - ref).max(-1) <= 2 * REGION_TOLERANCE
    out = mask.copy()
    out[sy, sx] |= like
    return out


def cut(mask: np.ndarray, share: float, angle: float) -> np.ndarray:
    """The mask with ``share`` of its pixels cut off beyond a line at ``angle`` (radians)."""
    ys, xs = np.nonzero(mask)
    proj = np.cos(angle) * xs + np.sin(angle) * ys
    keep = proj <= np.quantile(proj, 1 - share)
    out = np.zeros_like(mask)
    out[ys[keep], xs[keep]] = True
    return out


def salient_region(
    image: np.ndarray, taken: np.ndarray, rng: np.random.Generator
) -> np.ndarray | None:
    """A false detection's mask: a point drawn among the pixels not ``taken``, weighted by how
    far their colour is from the image's median (clutter stands out), and SAM's answer for a box
    around it: the connected pixels of the box within ``REGION_TOLERANCE`` of the point's
    colour. None when nothing is left to take."""
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    weight = np.abs(img - np.median(img.reshape(-1, 3), axis=0)).max(-1) + 1.0
    weight[taken] = 0
    total = weight.sum()
    if total <= 0:
        return None
    at = int(rng.choice(h * w, p=(weight / total).ravel()))
    cy, cx = divmod(at, w)
    half = max(2, int(rng.uniform(0.08, 0.2) * min(h, w)))
    sy = slice(max(0, cy - half), min(h, cy + half + 1))
    sx = slice(max(0, cx - half), min(w, cx + half + 1))
    like = np.abs(img[sy, sx] - img[cy, cx]).max(-1) <= REGION_TOLERANCE
    lab, _ = ndimage.label(like)
    region = np.zeros((h, w), bool)
    region[sy, sx] = lab == lab[cy - sy.start, cx - sx.start]
    region &= ~taken
    return region if region.sum() >= MIN_PIECE else None


class GroundedProxyLabeler:
    """Grounded-SAM's kinds of labels and errors, offline, from the positive alone."""

    name = "grounded_proxy"

    def __init__(
        self, params: GroundedProxyParams, difference: DifferenceLabelerParams | None = None
    ) -> None:
        self.params = params
        self.difference = difference or DifferenceLabelerParams()
        # part of the label cache key: the counterfactual check reads the difference params
        self.fingerprint = self.difference.model_dump_json() if params.cf_check else ""

    def label(self, batch: Sequence[LabelInput], ignore: int) -> list[LabelResult]:
        """Masks (HW int64 class indices), per-class scores, detections and the counterfactual
        check for each pair of ``batch`` (images HWC uint8 RGB)."""
        return [self.label_one(item, ignore) for item in batch]

    def detect(self, item: LabelInput) -> tuple[list[Detection], tuple[np.ndarray, np.ndarray]]:
        """Detections on the positive alone, errors included (drawn from the sample's id), and
        the lighting the positive was seen under (see :func:`perceive`)."""
        p = self.params
        rng = seeding.rng(p.seed, "label.grounded_proxy", item.id)
        image = item.positive
        paints = class_paints(item.class_names)

        # 1. Perception; classes of one colour share its pieces at random.
        pieces, lighting = perceive(image, paints, p.tolerance)
        dets: list[Detection] = []
        for k in range(len(paints)):
            twins = [j for j in range(len(paints)) if paints[j][0] == paints[k][0]]
            if twins[0] != k:
                continue  # the first class of a colour holds its pieces
            for m in pieces[k]:
                owner = twins[int(rng.integers(len(twins)))] if len(twins) > 1 else k
                score = 0.55 + 0.4 * min(1.0, m.sum() / (0.02 * m.size))
                dets.append(Detection(int(item.class_ids[owner]), float(score), m))

        # 2. Errors per object: confusion, missed part, bleeding (one draw each, fixed order).
        for d in dets:
            u_conf, u_miss, u_bleed = rng.random(3)
            share = rng.uniform(0.1, p.miss_share)
            angle = rng.uniform(0, 2 * np.pi)
            grow = rng.uniform(0.1, 1.0) * p.bleed_margin
            name = dict(zip(item.class_ids, item.class_names, strict=True))
            others = [c for c in item.class_ids if c != d.class_id]
            if others:
                sims = [word_overlap(name[d.class_id], name[c]) for c in others]
                j = int(np.argmax(sims))
                if u_conf < p.confusion * sims[j]:
                    d.class_id = others[j]
            if u_miss < p.miss:
                d.mask = cut(d.mask, share, angle)
            if u_bleed < p.bleed:
                d.mask = bleed(d.mask, image, grow)

        # 3. Clutter: one false detection per image, for one of the classes.
        u_clutter, which = rng.random(), int(rng.integers(len(item.class_ids)))
        if u_clutter < p.clutter:
            taken = np.zeros(image.shape[:2], bool)
            for d in dets:
                taken |= d.mask
            region = salient_region(image, taken, rng)
            if region is not None:
                score = float(rng.uniform(0.3, 0.55))
                dets.append(Detection(int(item.class_ids[which]), score, region, false=True))
        return dets, lighting

    def label_one(self, item: LabelInput, ignore: int) -> LabelResult:
        dets, lighting = self.detect(item)
        h, w = item.positive.shape[:2]
        mask = np.zeros((h, w), np.int64)
        for d in sorted(dets, key=lambda d: d.score):  # the best is painted last and wins
            mask[d.mask] = d.class_id
        best = {c: 0.0 for c in item.class_ids}
        for d in dets:
            best[d.class_id] = max(best[d.class_id], d.score)
        res = LabelResult(
            mask=mask,
            scores=[round(best[c], 5) for c in item.class_ids],
            detections=[
                {"class_id": d.class_id, "score": round(d.score, 5), "box": d.box()} for d in dets
            ],
            meta={"false_detections": sum(d.false for d in dets)},
        )
        if self.params.cf_check:
            res.cf_detected = self.cf_detected(item, dets, lighting)
            diff = difference_foreground(item.positive, item.counterfactual, self.difference)
            fg = (mask > 0) & (mask != ignore)
            union = int((fg | diff).sum())
            res.cf_agreement = float((fg & diff).sum() / union) if union else 1.0
        return res

    def cf_detected(
        self,
        item: LabelInput,
        dets: Sequence[Detection],
        lighting: tuple[np.ndarray, np.ndarray],
    ) -> list[bool]:
        """Per class, whether it is found in the counterfactual: its colours show there (under
        the positive's ``lighting``: the pair shares its scene, and an image without the objects
        has nothing to fit a lighting to), or a false detection of it covers a region the
        counterfactual shows unchanged."""
        paints = class_paints(item.class_names)
        seen, _ = perceive(item.counterfactual, paints, self.params.tolerance, lighting)
        found = {  # classes of one colour are found together
            c
            for k, pieces in enumerate(seen)
            if pieces
            for c, p in zip(item.class_ids, paints, strict=True)
            if p[0] == paints[k][0]
        }
        pos = item.positive.astype(np.int16)
        cf = item.counterfactual.astype(np.int16)
        for d in dets:
            if d.false:
                change = np.abs(pos[d.mask] - cf[d.mask]).max(-1)
                if np.median(change) <= SAME_REGION:
                    found.add(d.class_id)
        return [c in found for c in item.class_ids]
