"""Drawing helpers for galleries and ``magicseg predict``: palettes, mask overlays, legends.

All images are HWC uint8 RGB; masks are HW int class indices (0 = background).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(num_classes: int) -> np.ndarray:
    """(1 + num_classes) x 3 uint8 colours: index 0 (background) black, then well-spread hues
    (golden-ratio steps) so neighbouring class ids differ."""
    out = np.zeros((num_classes + 1, 3), np.uint8)
    for i in range(1, num_classes + 1):
        h = (i * 0.618033988749895) % 1.0
        s = 0.65 + 0.35 * ((i // 7) % 2)
        v = 0.95 - 0.25 * ((i // 3) % 2)
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255).astype(np.uint8)
    return out


def colorize(mask: np.ndarray, colours: np.ndarray, ignore: int | None = None) -> np.ndarray:
    """HW class-index mask -> HWC uint8 colour image (ignore pixels white, unknown ids grey)."""
    out = np.full((*mask.shape, 3), 128, np.uint8)
    valid = (mask >= 0) & (mask < len(colours))
    out[valid] = colours[mask[valid]]
    if ignore is not None:
        out[mask == ignore] = 255
    return out


def overlay(
    image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.55
) -> np.ndarray:
    """Blend class colours over ``image`` (HWC uint8) where ``mask`` > 0 (and not ignore)."""
    fg = (mask > 0) & (mask < len(colours))
    out = image.astype(np.float32)
    col = colours[np.where(fg, mask, 0)].astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an HW or HWC array by an integer factor."""
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def legend(names: Sequence[str], colours: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """An HWC uint8 strip at least ``width`` wide (wider when a name needs it): one colour
    swatch + name per line."""
    font = ImageFont.load_default()
    line = 14
    text_w = max((int(font.getlength(n)) for n in names), default=0)
    size = (max(width, 60, 20 + text_w), line * max(len(names), 1) + 4)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (name, col) in enumerate(zip(names, colours, strict=True)):
        y = 2 + i * line
        draw.rectangle([2, y + 1, 12, y + 11], fill=tuple(int(c) for c in col))
        draw.text((16, y), name, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized HWC uint8 images (rows of columns) with a white ``pad``."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y : y + h, x : x + w] = im
    return out


def stack_vertical(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Stack two HWC uint8 images, the narrower padded white on the right."""
    w = max(top.shape[1], bottom.shape[1])

    def pad(a: np.ndarray) -> np.ndarray:
        out = np.full((a.shape[0], w, 3), 255, np.uint8)
        out[:, : a.shape[1]] = a
        return out

    return np.concatenate([pad(top), pad(bottom)], axis=0)
