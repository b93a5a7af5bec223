"""Drawing: palettes, mask overlays, legends and the one gallery family (the filter's and
evaluate's galleries, ``magicseg predict``'s overlays).

All images are HWC uint8 RGB; masks are HW int class indices (0 = background, ``ignore`` =
the vocabulary's ignore value, :func:`magicseg.core.io.ignore_index`: 255 for uint8 masks,
65535 for uint16 ones).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

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


IGNORE_GREY = 128
"""Colour (grey level) of ignore pixels in overlays."""


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    colours: np.ndarray,
    ignore: int | None = None,
    alpha: float = 0.55,
) -> np.ndarray:
    """Blend class colours over ``image`` (HWC uint8) where ``mask`` > 0; ``ignore`` pixels are
    blended with grey; other ids outside the palette are left as they are."""
    fg = (mask > 0) & (mask < len(colours))
    out = image.astype(np.float32)
    col = colours[np.where(fg, mask, 0)].astype(np.float32)
    if ignore is not None:
        fg_or_ignore = fg | (mask == ignore)
        col[mask == ignore] = IGNORE_GREY
        fg = fg_or_ignore
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


def fit(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """HWC uint8 scaled to fit ``size`` = (H, W) (aspect kept), centred on white; ``nearest``
    for label images (no blended colours)."""
    h, w = image.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    small = np.asarray(Image.fromarray(image).resize((nw, nh), resample))
    out = np.full((*size, 3), 255, np.uint8)
    y, x = (size[0] - nh) // 2, (size[1] - nw) // 2
    out[y : y + nh, x : x + nw] = small
    return out


def caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` (HWC uint8) with a white line of ``text`` underneath."""
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + 14), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    ImageDraw.Draw(canvas).text((2, image.shape[0] + 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def draw_gallery(
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[str] | None = None,
    legend_items: tuple[Sequence[str], Sequence[Sequence[int]]] | None = None,
) -> np.ndarray:
    """The gallery every plot uses: ``rows`` of equally sized HWC uint8 tiles side by side
    (white padding), a caption line under each row when ``captions`` are given, and a legend
    of (names, colours) underneath when ``legend_items`` has any."""
    if captions is None:
        picture = grid(rows)
    else:
        strips = [caption(grid([row]), text) for row, text in zip(rows, captions, strict=True)]
        picture = strips[0]
        for strip in strips[1:]:
            picture = stack_vertical(picture, strip)
    if legend_items and legend_items[0]:
        picture = stack_vertical(picture, legend(*legend_items, picture.shape[1]))
    return picture


def write_gallery(
    path: str | Path,
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[str] | None = None,
    legend_items: tuple[Sequence[str], Sequence[Sequence[int]]] | None = None,
) -> None:
    """:func:`draw_gallery` written as PNG (atomically)."""
    from magicseg.core.io import write_image

    write_image(path, draw_gallery(rows, captions, legend_items))


def class_legend(
    masks: Sequence[np.ndarray], names: Sequence[str], colours: np.ndarray
) -> tuple[list[str], list[np.ndarray]]:
    """(names, colours) of the classes 1..len(names) that occur in any of ``masks``."""
    present: set[int] = set()
    for m in masks:
        present |= set(np.unique(m).tolist())
    shown = sorted(c for c in present if 0 < c <= len(names))
    return [names[c - 1] for c in shown], [colours[c] for c in shown]
