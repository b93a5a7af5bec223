"""The miniature web: procedural images with captions, no masks.

Every image shows one catalogue object (classes cycled, so each of the 252 gets the same
share, held-out classes included: web text covers words that segmentation data lacks) on a
plain background or in a textured scene with unlabelled clutter, drawn with the same primitives
as the offline generator (:mod:`magicseg.scene`) but from the corpus's own seeds
(``pretrain.seed``). Its caption is one of :data:`CONTEXTS` filled with the class name (and the
scene word): a caption says what is in the picture, never where.

The captions are indexed as (context, class): :func:`caption_texts` lists them all, so the
trainer encodes each once and scores an image against every class's caption of the image's
own context (a 252-way softmax, LiT-like).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from magicseg.core.catalogue import CATALOGUE
from magicseg.core.seeding import rng
from magicseg.scene import (
    STYLES,
    SceneSpec,
    _light,
    _to_u8,
    draw_clutter,
    paint_object,
    render_background,
    shape_mask,
)

SCENE_WORDS: dict[str, str] = {
    "forest": "forest",
    "beach": "beach",
    "street": "street",
    "brick": "alley",
    "indoor": "kitchen",
    "snow": "snow",
    "desert": "desert",
    "water": "harbour",
    "grass": "garden",
    "night": "night",
}
"""The word a caption uses for each scene style of :data:`magicseg.scene.STYLES`."""

CONTEXTS: tuple[str, ...] = (
    "{c}",
    "a photo of a {c}",
    *(f"a {{c}} in the {word}" for word in SCENE_WORDS.values()),
    "a {c} on a plain background",
)
"""Caption templates: the bare name (what the segmenters encode), a generic one, one per scene
style, and the plain background's."""
BARE = 0
"""The context of the zero-shot test: the bare class name, as the segmenters encode classes."""
TINTS = ((1.08, 1.0, 0.86), (0.9, 0.96, 1.1), (0.78, 0.78, 0.84))


@dataclass
class Corpus:
    """``images`` NxSxSx3 uint8; ``classes`` N catalogue indices (0-based); ``contexts`` N
    indices into :data:`CONTEXTS` (the caption of image i is ``CONTEXTS[contexts[i]]`` filled
    with ``CATALOGUE[classes[i]].name``); ``masks`` NxSxS bool, the object's pixels (kept for
    the zero-shot test's dense score only: training never sees them)."""

    images: np.ndarray
    classes: np.ndarray
    contexts: np.ndarray
    masks: np.ndarray | None = None

    def caption(self, i: int) -> str:
        return CONTEXTS[int(self.contexts[i])].format(c=CATALOGUE[int(self.classes[i])].name)


def class_names() -> list[str]:
    """The catalogue's class names, in catalogue order."""
    return [c.name for c in CATALOGUE]


def caption_texts() -> list[str]:
    """Every caption, context-major: index ``ctx * len(CATALOGUE) + class``."""
    names = class_names()
    return [ctx.format(c=n) for ctx in CONTEXTS for n in names]


def render_image(
    seed: int, test: bool, i: int, size: int, plain_fraction: float, distractors: int
) -> tuple[np.ndarray, int, int]:
    """Image ``i`` of the corpus, or of the zero-shot test (``test``), its class ``i`` modulo
    the catalogue: (SxSx3 uint8, class index, context index, SxS bool object mask). The same
    arguments always give the same bytes."""
    g = rng(seed, "pretrain.test", i) if test else rng(seed, "pretrain.corpus", i)
    cls = i % len(CATALOGUE)
    cat = CATALOGUE[cls]
    styles = sorted(STYLES)
    style = None if g.random() < plain_fraction else styles[int(g.integers(len(styles)))]
    tint = TINTS[int(g.integers(len(TINTS)))] if g.random() < 0.2 else None
    spec = SceneSpec(style, tint, bool(g.random() < 0.1), None, (None, None))
    img = render_background(spec, g, size, size)
    if style is not None and distractors:
        draw_clutter(img, g, int(g.integers(0, distractors + 1)))
    r = 0.5 * g.uniform(0.22, 0.5) * size * 1.25
    cy, cx = g.uniform(0.25, 0.75, 2) * size
    theta = float(g.uniform(-0.5, 0.5))
    mask = shape_mask(cat.shape, size, size, cy, cx, r, theta)
    paint_object(img, cat, mask, g, theta)
    _light(img, spec)
    img += g.normal(0, 2.0, img.shape).astype(np.float32)
    scene_ctx = 2 + list(SCENE_WORDS).index(style) if style else len(CONTEXTS) - 1
    ctx = (BARE, 1, scene_ctx)[int(g.integers(3))]
    return _to_u8(img), cls, ctx, mask


def render_corpus(
    seed: int,
    test: bool,
    n: int,
    size: int,
    plain_fraction: float,
    distractors: int,
    progress: bool = False,
) -> Corpus:
    """``n`` images of the corpus, or of the zero-shot test (``test``, which keeps the object
    masks)."""
    from tqdm import tqdm

    images = np.empty((n, size, size, 3), np.uint8)
    classes = np.empty(n, np.int64)
    contexts = np.empty(n, np.int64)
    masks = np.empty((n, size, size), bool) if test else None
    what = "zero-shot test" if test else "corpus"
    for i in tqdm(range(n), desc=f"render {what}", unit="image", disable=not progress):
        images[i], classes[i], contexts[i], mask = render_image(
            seed, test, i, size, plain_fraction, distractors
        )
        if masks is not None:
            masks[i] = mask
    return Corpus(images, classes, contexts, masks)


def split_of(names: Sequence[str], holdout: set[int], kinds: dict[str, Sequence[int]]):
    """Catalogue index -> "seen", or the held-out kind, for a vocabulary's 1-based ids."""
    by_name = {n: i for i, n in enumerate(class_names())}
    out = dict.fromkeys(range(len(CATALOGUE)), "unused")
    for vid, name in enumerate(names, 1):
        if name in by_name:
            out[by_name[name]] = "seen" if vid not in holdout else "heldout"
    for kind, ids in kinds.items():
        for vid in ids:
            if names[vid - 1] in by_name:
                out[by_name[names[vid - 1]]] = kind
    return out
