"""Files between stages: manifests, images, masks, JSON; every write is atomic.

Formats
- Images: PNG, RGB, HWC uint8 arrays in memory.
- Masks: PNG of class indices, HW. 0 = background, 1..K = vocabulary index. ``uint8`` when the
  vocabulary has at most 254 classes (ignore = 255), else ``uint16`` (ignore = 65535).
- Manifests: ``manifest.parquet`` per stage output, one row per item, a stable unique ``id``
  column, paths relative to the manifest's directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from magicseg.core.errors import DataError

MANIFEST = "manifest.parquet"
IGNORE_U8 = 255
IGNORE_U16 = 65535


def mask_dtype(num_classes: int) -> np.dtype:
    """Mask dtype for a vocabulary of ``num_classes`` classes (background not counted)."""
    return np.dtype(np.uint8) if num_classes < IGNORE_U8 else np.dtype(np.uint16)


def ignore_index(num_classes: int) -> int:
    """The ignore value of masks for a vocabulary of ``num_classes`` classes."""
    return IGNORE_U8 if num_classes < IGNORE_U8 else IGNORE_U16


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    A crash or kill leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


IMAGE_SUFFIX = {"png": ".png", "jpeg": ".jpg"}
"""``generate.image_format`` -> the suffix of its files."""
JPEG_QUALITY = 75
"""PIL's default JPEG quality, what the published generation script saved with."""


def write_image(path: str | Path, image: np.ndarray, image_format: str = "png") -> None:
    """Write an HWC uint8 RGB array as ``png`` (lossless) or ``jpeg`` (quality 75); the same
    array gives the same bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected HWC uint8 RGB, got {image.dtype} {image.shape}")
    if image_format not in IMAGE_SUFFIX:
        raise ValueError(f"image format {image_format!r}: expected one of {sorted(IMAGE_SUFFIX)}")
    with atomic_path(path) as tmp:
        if image_format == "jpeg":
            Image.fromarray(image).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        else:
            Image.fromarray(image).save(tmp, format="PNG", compress_level=6)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as HWC uint8 RGB; a corrupt or missing file raises DataError."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def write_mask(path: str | Path, mask: np.ndarray, num_classes: int) -> None:
    """Write an HW class-index mask as PNG, uint8 or uint16 by vocabulary size."""
    if mask.ndim != 2:
        raise ValueError(f"expected an HW mask, got shape {mask.shape}")
    dtype = mask_dtype(num_classes)
    if mask.size and int(mask.max()) > ignore_index(num_classes):
        raise ValueError(f"mask value {int(mask.max())} does not fit {dtype}")
    arr = mask.astype(dtype)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=6)  # L or I;16


def read_mask(path: str | Path) -> np.ndarray:
    """Read a class-index mask PNG as an HW int64 array."""
    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int64)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read mask ({err})") from None


def write_manifest(directory: str | Path, frame: pd.DataFrame, name: str = MANIFEST) -> Path:
    """Write a manifest parquet atomically; rows keep their order, index dropped."""
    path = Path(directory) / name
    if "id" in frame.columns and frame["id"].duplicated().any():
        dup = frame.loc[frame["id"].duplicated(), "id"].iloc[0]
        raise ValueError(f"duplicate id {dup!r} in {path}")
    with atomic_path(path) as tmp:
        frame.reset_index(drop=True).to_parquet(tmp, index=False)
    return path


def read_manifest(directory: str | Path, name: str = MANIFEST) -> pd.DataFrame:
    """Read a stage's manifest; a missing one is a DataError naming the stage output."""
    path = Path(directory) / name
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the stage that writes {directory})")
    return pd.read_parquet(path)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
