"""The procedural scene renderer's core: catalogue shapes, object paint, scene backgrounds,
clutter, lighting and drift, shared by every procedural image source.

:mod:`magicseg.generate.procedural` (the offline stand-in for Stable Diffusion),
:mod:`magicseg.evaluation.procedural` (the procedural test set, through that generator) and the
pretraining corpus of the miniature CLIP build their images from these primitives. The module
depends on the catalogue alone, so the stages that use it re-run only when drawing changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from magicseg.core.catalogue import Category

# scene style: (colour A, colour B, texture)
STYLES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], str]] = {
    "forest": ((44, 66, 40), (96, 84, 62), "noise"),
    "beach": ((196, 206, 214), (206, 186, 146), "split"),
    "street": ((112, 112, 116), (150, 146, 140), "tiles"),
    "brick": ((128, 78, 64), (96, 90, 88), "bricks"),
    "indoor": ((188, 168, 136), (132, 104, 78), "tiles"),
    "snow": ((226, 230, 236), (170, 180, 194), "noise"),
    "desert": ((206, 168, 118), (168, 118, 84), "split"),
    "water": ((86, 112, 128), (140, 156, 160), "waves"),
    "grass": ((92, 118, 66), (150, 150, 104), "noise"),
    "night": ((30, 32, 44), (66, 62, 70), "spots"),
}
KEYWORDS: dict[str, str] = {
    **dict.fromkeys(("forest", "pine", "woods", "jungle", "trees", "moss", "mossy"), "forest"),
    **dict.fromkeys(("beach", "sand", "sandy", "shore", "coast", "seaside"), "beach"),
    **dict.fromkeys(
        ("street", "city", "market", "road", "sidewalk", "playground", "square", "town", "station"),
        "street",
    ),
    **dict.fromkeys(("alley", "brick", "wall", "graffiti", "warehouse"), "brick"),
    **dict.fromkeys(
        (
            "kitchen",
            "office",
            "desk",
            "room",
            "living",
            "counter",
            "table",
            "shelf",
            "bookshelves",
            "indoors",
            "indoor",
            "house",
            "cafe",
            "restaurant",
        ),
        "indoor",
    ),
    **dict.fromkeys(("snow", "snowy", "mountain", "ice", "winter", "frosted", "glacier"), "snow"),
    **dict.fromkeys(("desert", "canyon", "dune", "dusty", "savanna"), "desert"),
    **dict.fromkeys(
        (
            "harbour",
            "harbor",
            "lake",
            "lakeside",
            "river",
            "sea",
            "ocean",
            "pier",
            "dock",
            "water",
            "pond",
            "rain",
            "rainy",
        ),
        "water",
    ),
    **dict.fromkeys(
        ("garden", "field", "park", "meadow", "grass", "grassy", "farm", "lawn", "hills"), "grass"
    ),
    **dict.fromkeys(("night", "neon", "dark", "midnight"), "night"),
}
TINTS: dict[str, tuple[float, float, float]] = {
    **dict.fromkeys(("golden", "warm", "sunset", "sunrise"), (1.08, 1.0, 0.86)),
    **dict.fromkeys(("dusk", "blue", "cool", "twilight"), (0.9, 0.96, 1.1)),
    **dict.fromkeys(("night", "neon", "dark", "flickering"), (0.78, 0.78, 0.84)),
}
FOG_WORDS = {"fog", "foggy", "mist", "misty", "haze", "hazy"}
SIZE_WORDS = {"tiny": 0.16, "small": 0.22, "large": 0.38, "huge": 0.46, "big": 0.38}
PLACE_WORDS = {
    "left": (None, 0.28),
    "right": (None, 0.72),
    "top": (0.28, None),
    "bottom": (0.72, None),
    "middle": (0.5, 0.5),
    "centre": (0.5, 0.5),
    "center": (0.5, 0.5),
}
CLUTTER_COLOURS = np.array(
    [
        (120, 110, 100),
        (88, 80, 72),
        (152, 142, 124),
        (70, 72, 80),
        (172, 164, 152),
        (104, 120, 112),
        (60, 52, 46),
        (140, 128, 136),
    ],
    dtype=np.float32,
)


@dataclass
class SceneSpec:
    """What the prompt asks for, as the renderer understands it."""

    style: str | None
    tint: tuple[float, float, float] | None
    fog: bool
    size: float | None
    place: tuple[float | None, float | None]


def read_prompt(prompt: str) -> SceneSpec:
    """Parse scene, lighting, size and placement words (unknown words are ignored)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    style = next((KEYWORDS[w] for w in words if w in KEYWORDS), None)
    tint = next((TINTS[w] for w in words if w in TINTS), None)
    size = next((SIZE_WORDS[w] for w in words if w in SIZE_WORDS), None)
    cy = cx = None
    for w in words:
        if w in PLACE_WORDS:
            py, px = PLACE_WORDS[w]
            cy, cx = (py if py is not None else cy), (px if px is not None else cx)
            break
    return SceneSpec(style, tint, any(w in FOG_WORDS for w in words), size, (cy, cx))


# --------------------------------------------------------------------------------------------
# drawing primitives: masks on an HxW grid
# --------------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def shape_mask(
    shape: str, h: int, w: int, cy: float, cx: float, r: float, theta: float
) -> np.ndarray:
    """Boolean HxW mask of a catalogue shape centred at (cy, cx) with radius ``r`` pixels,
    rotated by ``theta`` radians. Every shape fits in about the disc of radius ``r``; narrow
    parts (ring, frame, bone, arrow shaft, bowtie knot) are at least 0.35 r wide, so they
    survive the labeler's opening at the default 64 px (where r is about 6 to 16 px)."""
    yy, xx = _grid(h, w)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r  # unit coordinates, v points down
    try:
        return _SHAPES[shape](u, v)
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}") from None


def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, rad: float) -> np.ndarray:
    return (u - cu) ** 2 + (v - cv) ** 2 <= rad**2


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.2 * u, -1.2 * v + 0.25
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    head = (u >= 0.05) & (u <= 0.95) & (np.abs(v) <= 0.95 * (0.95 - u))
    shaft = (u >= -0.95) & (u < 0.05) & (np.abs(v) <= 0.26)
    return head | shaft


def _drop(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bulb = _disc(u, v, 0, 0.35, 0.6)
    tip = (v >= -0.95) & (v <= 0.35) & (np.abs(u) <= 0.6 * (v + 0.95) / 1.3)
    return bulb | tip


def _cloud(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    base = (np.abs(u) <= 0.72) & (v >= 0.05) & (v <= 0.6)
    return (
        base
        | _disc(u, v, -0.58, 0.25, 0.35)
        | _disc(u, v, 0.58, 0.25, 0.35)
        | _disc(u, v, -0.2, -0.12, 0.5)
        | _disc(u, v, 0.32, -0.02, 0.42)
    )


def _shield(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    upper = (v >= -0.85) & (v <= -0.05) & (np.abs(u) <= 0.72)
    lower = (v > -0.05) & (v <= 0.95) & (np.abs(u) <= 0.72 * np.sqrt(np.clip(0.95 - v, 0, 1)))
    return upper | lower


def _bone(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bar = (np.abs(u) <= 0.62) & (np.abs(v) <= 0.2)
    knobs = [_disc(u, v, su * 0.68, sv * 0.2, 0.26) for su in (-1, 1) for sv in (-1, 1)]
    return bar | knobs[0] | knobs[1] | knobs[2] | knobs[3]


_SHAPES = {
    "ball": lambda u, v: u**2 + v**2 <= 1,
    "box": lambda u, v: (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82),
    "kite": lambda u, v: np.abs(u) / 0.66 + np.abs(v) <= 1.0,
    "star": lambda u, v: np.hypot(u, v) <= 0.5 + 0.5 * np.abs(np.cos(2.5 * np.arctan2(v, u))),
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.55**2),
    "tent": lambda u, v: (v >= -0.85) & (v <= 0.85) & (np.abs(u) <= (v + 0.85) / 1.7),
    "heart": _heart,
    "arrow": _arrow,
    "crescent": lambda u, v: (u**2 + v**2 <= 1) & ~_disc(u, v, 0.45, -0.15, 0.8),
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.92))
    ),
    "frame": lambda u, v: (
        (np.maximum(np.abs(u), np.abs(v)) <= 0.82) & (np.maximum(np.abs(u), np.abs(v)) >= 0.46)
    ),
    "bowtie": lambda u, v: (
        ((np.abs(u) <= 0.92) & (np.abs(v) <= 0.1 + 0.8 * np.abs(u)))
        | ((np.abs(u) <= 0.22) & (np.abs(v) <= 0.3))
    ),  # two wings and the knot
    "drop": _drop,
    "cloud": _cloud,
    "shield": _shield,
    "bone": _bone,
    "dome": lambda u, v: (u**2 + (v - 0.4) ** 2 <= 1.0) & (v <= 0.4),
}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], HxW float32."""
    coarse = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    return ndimage.zoom(coarse, (h / (cells + 1), w / (cells + 1)), order=1)[:h, :w]


def render_background(spec: SceneSpec, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float32 background in [0, 255]: plain when the prompt names no scene."""
    yy, xx = _grid(h, w)
    if spec.style is None:
        base = rng.uniform(196, 236) + rng.uniform(-6, 6, size=3)
        img = np.broadcast_to(base.astype(np.float32), (h, w, 3)).copy()
        return img + 6 * _smooth_noise(rng, h, w, 3)[..., None]
    a, b, texture = STYLES[spec.style]
    a = np.array(a, np.float32) + rng.uniform(-12, 12, 3)
    b = np.array(b, np.float32) + rng.uniform(-12, 12, 3)
    t = (yy / h)[..., None]
    if texture == "split":
        horizon = rng.uniform(0.3, 0.6) * h
        t = 1 / (1 + np.exp(-(yy - horizon) / 1.5))[..., None]
    img = a * (1 - t) + b * t
    n = _smooth_noise(rng, h, w, int(rng.integers(4, 9)))[..., None]
    img = img + 22 * n
    if texture == "tiles":
        step = int(rng.integers(7, 13))
        lines = ((yy.astype(int) % step) == 0) | ((xx.astype(int) % step) == 0)
        img[lines] *= 0.78
    elif texture == "bricks":
        step = int(rng.integers(5, 8))
        row = yy.astype(int) // step
        joint = ((yy.astype(int) % step) == 0) | (
            ((xx.astype(int) + (row % 2) * step) % (2 * step)) == 0
        )
        img[joint] = img[joint] * 0.5 + 90
    elif texture == "waves":
        img = img + 14 * np.sin(yy / rng.uniform(1.5, 3.0) + 2 * n[..., 0])[..., None]
    elif texture == "spots":
        spots = rng.random((h, w)) < 0.015
        img[spots] = 230
    return img


def draw_clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> list[dict]:
    """Draw ``count`` unlabelled clutter objects (muted colours; ellipses, bars, L-brackets and
    blobs, none of them a catalogue shape) into ``img`` in place; returns their specs so the
    counterfactual can redraw them."""
    h, w = img.shape[:2]
    specs = []
    for _ in range(count):
        spec = {
            "kind": str(rng.choice(["ellipse", "bar", "angle", "blob"])),
            "cy": float(rng.uniform(0, h)),
            "cx": float(rng.uniform(0, w)),
            "r": float(rng.uniform(0.05, 0.16) * min(h, w)),
            "theta": float(rng.uniform(0, np.pi)),
            "colour": CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))]
            + rng.uniform(-10, 10, 3).astype(np.float32),
        }
        _paint_clutter(img, spec)
        specs.append(spec)
    return specs


def _paint_clutter(img: np.ndarray, spec: dict) -> None:
    h, w = img.shape[:2]
    yy, xx = _grid(h, w)
    dy, dx = yy - spec["cy"], xx - spec["cx"]
    c, s = np.cos(spec["theta"]), np.sin(spec["theta"])
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = spec["r"]
    kind = spec["kind"]
    if kind == "ellipse":
        m = (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    elif kind == "bar":
        m = (np.abs(u) <= 1.6 * r) & (np.abs(v) <= 0.18 * r + 0.6)
    elif kind == "angle":  # an L-shaped bracket (not a catalogue shape)
        arm = 0.2 * r + 0.5
        m = ((u >= -arm) & (u <= r) & (np.abs(v) <= arm)) | (
            (v >= -arm) & (v <= r) & (np.abs(u) <= arm)
        )
    else:
        m = (u / r) ** 2 + (v / r) ** 2 <= 0.6
    img[m] = spec["colour"]


def paint_object(
    img: np.ndarray, cat: Category, mask: np.ndarray, rng: np.random.Generator, theta: float
) -> None:
    """Fill ``mask`` with the category's colour, shading and texture, in place."""
    h, w = mask.shape
    yy, xx = _grid(h, w)
    colour = np.array(cat.rgb, np.float32) + rng.normal(0, 7, 3).astype(np.float32)
    grad = rng.uniform(-0.12, 0.12)
    shade = 1 + grad * ((xx - w / 2) / w + (yy - h / 2) / h)
    fill = colour[None, None, :] * shade[..., None]
    if cat.texture != "plain":  # bands or dots in a dark shade of the colour
        period = max(3.0, 0.08 * min(h, w))
        a = (np.cos(theta) * xx + np.sin(theta) * yy) / period
        b = (-np.sin(theta) * xx + np.cos(theta) * yy) / period
        if cat.texture == "striped":  # bands as wide as the colour ones
            marks = (np.floor(a) % 2) == 0
        else:  # dotted: dots on a grid of two periods
            marks = ((a / 2) % 1 - 0.5) ** 2 + ((b / 2) % 1 - 0.5) ** 2 <= 0.3**2
        fill[marks] = np.array(cat.pattern_rgb, np.float32) * shade[marks][:, None]
    img[mask] = fill[mask]


def _redraw_clutter(
    bg: np.ndarray, clutter: list[dict], rng: np.random.Generator, drift: float
) -> np.ndarray:
    """Background with the clutter re-drawn, a ``drift / 2`` share of it moved elsewhere."""
    h, w = bg.shape[:2]
    img = bg.copy()
    for spec in clutter:
        if rng.random() < 0.5 * drift:
            spec = dict(
                spec, cy=spec["cy"] + rng.normal(0, 0.2 * h), cx=spec["cx"] + rng.normal(0, 0.2 * w)
            )
        _paint_clutter(img, spec)
    return img


def _global_drift(img: np.ndarray, rng: np.random.Generator, drift: float) -> np.ndarray:
    """Colour gain and offset, a smooth lighting field and extra noise, all scaled by drift."""
    h, w = img.shape[:2]
    gain = 1 + rng.normal(0, 0.06 * drift, 3).astype(np.float32)
    offset = rng.normal(0, 10 * drift, 3).astype(np.float32)
    field = 1 + 0.12 * drift * _smooth_noise(rng, h, w, 2)[..., None]
    return img * gain * field + offset + rng.normal(0, 6.0 * drift, img.shape).astype(np.float32)


def _light(img: np.ndarray, spec: SceneSpec) -> None:
    if spec.tint is not None:
        img *= np.array(spec.tint, np.float32)
    if spec.fog:
        img *= 0.7
        img += 0.3 * 200


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
