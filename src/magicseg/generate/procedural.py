"""The offline procedural pair generator: a CPU stand-in for Stable Diffusion.

It "reads" the prompt the way a text-to-image model would: scene words (forest, kitchen, harbour,
...) pick a textured background with unlabelled clutter, lighting words tint the image, size and
placement words move the object; a prompt without scene words (``style: plain``) gets a plain
background. The counterfactual is the same scene from the same seed without the objects, plus a
``drift`` (noise, colour/lighting shift, re-drawn clutter) so that it is not pixel-identical, as a
diffusion counterfactual never is. A plain prompt's counterfactual ("a photo of nothing") asks for
no scene at all, and Stable Diffusion paints it as a blank or noisy void: so does this generator
(:func:`render_void`, ``plain_counterfactual: void``), while a rich prompt's counterfactual keeps
its scene. The renderer's exact masks are kept for the ``oracle`` labeler. The drawing itself
lives in :mod:`magicseg.scene`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from magicseg.core.catalogue import BY_NAME
from magicseg.core.config import ProceduralGeneratorParams
from magicseg.core.errors import DataError
from magicseg.generate.base import Pair, PromptRecord
from magicseg.prompts.counterfactual import make_counterfactual
from magicseg.scene import (
    SceneSpec,
    _global_drift,
    _light,
    _redraw_clutter,
    _smooth_noise,
    _to_u8,
    draw_clutter,
    paint_object,
    read_prompt,
    render_background,
    shape_mask,
)

__all__ = [
    "ProceduralGenerator",
    "SceneSpec",
    "asks_for_nothing",
    "read_prompt",
    "render_void",
    "shape_mask",
]

VOID_WORDS = frozenset({"a", "an", "the", "photo", "picture", "image", "of", "and", "nothing"})
"""The words of a counterfactual prompt that asks for nothing ("a photo of nothing", the
literal rewrite's "a photo of a nothing and a nothing")."""


def asks_for_nothing(cf_prompt: str) -> bool:
    """Whether a counterfactual prompt names nothing but :data:`VOID_WORDS` (a plain prompt's
    counterfactual): no scene, no lighting, no object."""
    words = re.findall(r"[a-z]+", cf_prompt.lower())
    return bool(words) and set(words) <= VOID_WORDS


def render_void(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float32 in [0, 255]: what a text-to-image model paints for "a photo of nothing".

    Half the time a blank: one dark-to-mid grey tone (15 to 140, slightly tinted) with a soft
    vignette; half the time noise: a mid-grey base, blotchy low-frequency noise (mostly grey)
    and grain. Never the light tone of a plain prompt's background (196 to 236), so a void
    differs from its positive over most pixels, as a diffusion model's void does.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        tone = rng.uniform(15, 140) + rng.uniform(-8, 8, 3)
        r2 = ((yy + 0.5) / h - 0.5) ** 2 + ((xx + 0.5) / w - 0.5) ** 2
        img = tone.astype(np.float32) * (1 - 0.4 * r2[..., None])
        return img + 4 * _smooth_noise(rng, h, w, 3)[..., None]
    base = rng.uniform(60, 130) + rng.uniform(-10, 10, 3)
    cells = int(rng.integers(6, 13))
    blotches = 40 * _smooth_noise(rng, h, w, cells)[..., None] + 8 * np.stack(
        [_smooth_noise(rng, h, w, cells) for _ in range(3)], -1
    )
    grain = rng.normal(0, 14, (h, w, 1)) + rng.normal(0, 6, (h, w, 3))
    return (base + blotches + grain).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------------
class ProceduralGenerator:
    """Draws catalogue classes (see :mod:`magicseg.core.catalogue`) into prompt-driven scenes.

    ``generate`` returns, per record, the positive and counterfactual images (HWC uint8) and the
    exact class-index mask (HW int64, vocabulary indices).
    """

    name = "procedural"

    def __init__(self, params: ProceduralGeneratorParams, height: int, width: int) -> None:
        self.params = params
        self.height = height
        self.width = width

    def check(self, records: Sequence[PromptRecord]) -> None:
        """Refuse, before any work, classes the renderer cannot draw."""
        for rec in records:
            for name in rec.class_names:
                if name not in BY_NAME:
                    raise DataError(
                        f"the procedural generator cannot draw {name!r} (prompt {rec.id}); it "
                        "draws only its catalogue: use vocabulary.source: procedural, or "
                        "generate.backend: diffusers"
                    )

    def generate(self, batch: Sequence[PromptRecord]) -> list[Pair]:
        return [self.render(rec) for rec in batch]

    def render(self, rec: PromptRecord, drift: float | None = None) -> Pair:
        """Render one pair from ``rec.seed``; the same record always gives the same bytes."""
        drift = self.params.drift if drift is None else drift
        h, w = self.height, self.width
        rng = np.random.default_rng(rec.seed)
        # the scene is read without the class names: a colour word ("blue heart") is the
        # object's, not a lighting word
        spec = read_prompt(make_counterfactual(rec.prompt, rec.class_names))

        # 1. Shared scene: background and clutter (same random stream for both images).
        bg = render_background(spec, rng, h, w)
        clutter_count = self.params.distractors if spec.style is not None else 0
        pos = bg.copy()
        clutter = draw_clutter(pos, rng, clutter_count)
        cf = pos.copy()

        # 2. Objects into the positive only; exact class-index mask.
        mask = np.zeros((h, w), np.int64)
        occupied = np.zeros((h, w), bool)
        for cid, name in zip(rec.class_ids, rec.class_names, strict=True):
            cat = BY_NAME[name]
            size = spec.size if spec.size is not None else rng.uniform(0.24, 0.4)
            size *= rng.uniform(0.9, 1.1) * (0.8 if len(rec.class_ids) > 1 else 1.0)
            r = 0.5 * size * min(h, w) * 1.25
            theta = float(rng.uniform(-0.5, 0.5))
            m = None
            for attempt in range(12):
                py, px = spec.place if attempt < 6 else (None, None)
                cy = (py if py is not None else rng.uniform(0.25, 0.75)) * h
                cx = (px if px is not None else rng.uniform(0.25, 0.75)) * w
                cy += rng.normal(0, 0.05 * h)
                cx += rng.normal(0, 0.05 * w)
                m = shape_mask(cat.shape, h, w, cy, cx, r, theta)
                if not (m & occupied).sum() > 0.1 * max(m.sum(), 1):
                    break
            paint_object(pos, cat, m, rng, theta)
            mask[m] = cid
            occupied |= m

        # 3. The counterfactual's re-imagined clutter, or a void for a prompt that asks for
        #    nothing (their own stream: the positive never depends on them), then lighting and
        #    fog on both (a scene property).
        drift_rng = np.random.default_rng(rng.integers(2**63))
        void = self.params.plain_counterfactual == "void" and asks_for_nothing(rec.cf_prompt)
        if void:
            cf = render_void(drift_rng, h, w)
        elif drift > 0 and clutter:
            cf = _redraw_clutter(bg, clutter, drift_rng, drift)
        for img in (pos, cf):
            _light(img, spec)

        # 4. Shared sensor noise, then the counterfactual's global drift (a void has none).
        noise = rng.normal(0, 2.0, (h, w, 3)).astype(np.float32)
        pos += noise
        cf += noise
        if drift > 0 and not void:
            cf = _global_drift(cf, drift_rng, drift)

        return Pair(
            positive=_to_u8(pos),
            counterfactual=_to_u8(cf),
            oracle_mask=mask,
            meta={
                "scene": spec.style or "plain",
                "drift": drift,
                "counterfactual": "void" if void else "scene",
            },
        )
