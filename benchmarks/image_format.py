"""Label quality of PNG against JPEG (quality 75) generated images, offline.

``generate.image_format: jpeg`` is the published file format. This renders procedural pairs
(the offline world, exact masks known), stores each image both ways (PNG is lossless, so the
PNG side is the rendered array), labels both with the counterfactual-difference labeler and
prints the labels' mIoU against the exact masks (foreground and per class), the JPEG/PNG
ratio and the bytes per image of each format. Size: ``--size`` px (the offline profile's 64;
JPEG's 8x8 blocks weigh more at small sizes than at Stable Diffusion's 512).

    python benchmarks/image_format.py --pairs 300 --size 128
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from magicseg.core.config import DifferenceLabelerParams, ProceduralGeneratorParams
from magicseg.core.io import JPEG_QUALITY, ignore_index
from magicseg.core.vocabulary import build_vocabulary
from magicseg.evaluation.procedural import make_test_records
from magicseg.generate.procedural import ProceduralGenerator
from magicseg.label.base import LabelInput
from magicseg.label.difference import DifferenceLabeler


def encode(image: np.ndarray, fmt: str) -> tuple[np.ndarray, int]:
    """The image after a round trip through ``fmt`` and its encoded size in bytes."""
    buf = io.BytesIO()
    kwargs = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {"compress_level": 6}
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")), buf.getbuffer().nbytes


def miou(pred: np.ndarray, true: np.ndarray, ignore: int) -> tuple[float, float]:
    """(foreground IoU, mean IoU over the classes present in either), ignore pixels left out."""
    valid = pred != ignore
    fg = ((pred > 0) & (true > 0) & valid).sum() / max(((pred > 0) | (true > 0)).sum(), 1)
    ious = []
    for c in np.union1d(np.unique(true), np.unique(pred[valid])):
        if c == 0:
            continue
        inter = ((pred == c) & (true == c)).sum()
        union = ((pred == c) & valid | (true == c)).sum()
        ious.append(inter / max(union, 1))
    return float(fg), float(np.mean(ious)) if ious else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # 1. Procedural pairs with their exact masks.
    vocab = build_vocabulary("procedural")
    gen = ProceduralGenerator(ProceduralGeneratorParams(), args.size, args.size)
    records = make_test_records(vocab, args.pairs, args.seed)
    labeler = DifferenceLabeler(DifferenceLabelerParams())
    ignore = ignore_index(len(vocab))

    # 2. Each pair labelled from its PNG and from its JPEG files.
    scores: dict[str, list[tuple[float, float]]] = {"PNG": [], "JPEG": []}
    sizes: dict[str, list[int]] = {"PNG": [], "JPEG": []}
    for rec in records:
        pair = gen.render(rec)
        for fmt in scores:
            pos, n_pos = encode(pair.positive, fmt)
            cf, n_cf = encode(pair.counterfactual, fmt)
            sizes[fmt] += [n_pos, n_cf]
            item = LabelInput(rec.id, pos, cf, rec.class_ids, rec.class_names)
            mask = labeler.label([item], ignore)[0].mask
            scores[fmt].append(miou(mask, pair.oracle_mask, ignore))

    # 3. Report.
    print(f"{args.pairs} procedural pairs at {args.size} px, difference labeler (offline params)")
    raw = 3 * args.size**2
    for fmt in scores:
        fg, cls = np.mean(scores[fmt], axis=0)
        per = np.mean(sizes[fmt])
        print(
            f"{fmt:5s} foreground IoU {fg:.3f}  class mIoU {cls:.3f}  "
            f"{per:.0f} bytes an image ({per / raw:.3f} of raw)"
        )
    (fg_p, c_p), (fg_j, c_j) = np.mean(scores["PNG"], axis=0), np.mean(scores["JPEG"], axis=0)
    print(f"ratio JPEG/PNG: foreground IoU {fg_j / fg_p:.3f}, class mIoU {c_j / c_p:.3f}")


if __name__ == "__main__":
    main()
