"""Labels/second and peak memory of each labeler, against Grounded-SAM in the same run.

Labelers (random weights built from configs, no hub; loaded through the labelers' real path):

- ``grounded-sam``: Grounding DINO + SAM (the paper's; the baseline of the ratios);
- ``mm-gdino-sam21``: MM-Grounding-DINO + SAM 2.1 (LLMDet checkpoints load through the same
  class with the same architecture sizes, so one figure serves both);
- ``sam3``: SAM 3 alone, one text prompt per class.

Each labeler runs in its own process (so the peak RSS is its own) on the same pairs (1 or 2
classes each, counterfactual check on), ``--repeats`` timed passes after one warm-up. Random
weights detect everything or nothing, so every labeler keeps exactly ``--max-boxes`` instances
per image (thresholds 0): each decodes the same number of masks.

    python benchmarks/labelers.py                  # CPU, tiny configs, 128 px pairs
    python benchmarks/labelers.py --size small     # CPU, small configs (256 px models)
    python benchmarks/labelers.py --device cuda    # where a GPU is lent (not measured here)

Prints, per labeler: labels/s (pairs/s), the ratio to Grounded-SAM, the share of time per
part, the peak RSS and the RSS the models and the run added to the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELERS = ("grounded-sam", "mm-gdino-sam21", "sam3")
NAMES = [("school bus", "owl"), ("dog",), ("red car", "traffic light"), ("cat",)]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pairs(n: int, px: int, seed: int = 0):
    """``n`` LabelInputs: a noise scene, the positive with a bright box per class."""
    import numpy as np

    from magicseg.label.base import LabelInput

    rng = np.random.default_rng(seed)
    vocab = sorted({c for ns in NAMES for c in ns})
    out = []
    for i in range(n):
        names = NAMES[i % len(NAMES)]
        scene = rng.integers(0, 120, (px, px, 3), dtype=np.uint8)
        pos = scene.copy()
        for _ in names:
            y, x = rng.integers(0, px // 2, 2)
            pos[y : y + px // 3, x : x + px // 3] = rng.integers(150, 255, 3)
        ids = tuple(vocab.index(c) + 1 for c in names)
        out.append(LabelInput(f"p{i}", pos, scene, ids, names))
    return out


def build(name: str, root: Path, size: str, device: str, max_boxes: int, batch: int):
    """The labeler ``name`` on random weights saved under ``root``, loaded as a user's."""
    from tests.tiny_labelers import save_mm_grounding_dino, save_sam, save_sam2, save_sam3

    from magicseg.core.config import GroundedSamParams, Sam3Params
    from magicseg.label.grounded_sam import GroundedSamLabeler
    from magicseg.label.sam3 import Sam3Labeler

    common = {"device": device, "batch_size": batch, "max_detections": max_boxes}
    if name == "sam3":
        params = Sam3Params(
            checkpoint=str(save_sam3(root, size)),
            accept_licence=True,
            score_threshold=0.0,
            **common,
        )
        return Sam3Labeler(params)
    if name == "grounded-sam":
        from tests.tiny_grounded_sam import build_grounding_dino

        model, proc = build_grounding_dino(size)
        det = root / f"gdino-{size}"
        model.save_pretrained(det)
        proc.save_pretrained(det)
        seg = save_sam(root, size)
    else:
        det, seg = save_mm_grounding_dino(root, size), save_sam2(root, size)
    params = GroundedSamParams(
        detector_checkpoint=str(det),
        sam_checkpoint=str(seg),
        box_threshold=0.0,
        text_threshold=0.0,
        **common,
    )
    return GroundedSamLabeler(params)


def one(args) -> None:
    """Child process: one labeler, one JSON line on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    base = _rss_mib()
    items = pairs(args.images, args.px)
    with tempfile.TemporaryDirectory() as tmp:
        lab = build(args.one, Path(tmp), args.size, args.device, args.max_boxes, args.batch_size)
        loaded = _rss_mib()
        n_params = sum(
            p.numel()
            for m in vars(lab).values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
        )
        lab.label(items[: args.batch_size], ignore=255)  # warm-up
        lab.timings.reset()
        masks = 0
        start = time.perf_counter()
        for _ in range(args.repeats):
            for s in range(0, len(items), args.batch_size):
                results = lab.label(items[s : s + args.batch_size], ignore=255)
                masks += sum(len(r.detections) for r in results)
        seconds = time.perf_counter() - start
    labels = args.repeats * len(items)
    print(
        json.dumps(
            {
                "labeler": args.one,
                "labels_per_s": labels / seconds,
                "seconds": seconds,
                "masks_per_label": masks / labels,
                "params": n_params,
                "parts": {k: v / seconds for k, v in lab.timings.parts.items()},
                "rss_base_mib": base,
                "rss_loaded_mib": loaded,
                "rss_peak_mib": _rss_mib(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--px", type=int, default=128, help="pair side (square)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-boxes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--labelers", default=",".join(LABELERS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    print(
        f"device {args.device}, {args.size} configs, {args.images} pairs of {args.px} px, "
        f"batch {args.batch_size}, {args.max_boxes} instances per image, {args.threads} thread(s)"
        f", {args.repeats} passes"
    )
    rows = []
    for name in args.labelers.split(","):
        cmd = [sys.executable, __file__, "--one", name] + [
            a
            for k in (
                "device",
                "size",
                "images",
                "px",
                "batch_size",
                "max_boxes",
                "threads",
                "repeats",
            )  # fmt: skip
            for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["labeler"] == "grounded-sam"), None)
    for r in rows:
        ratio = f"  {r['labels_per_s'] / base['labels_per_s']:.2f}x Grounded-SAM" if base else ""
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["parts"].items()))
        print(
            f"{r['labeler']:<16} {r['labels_per_s']:7.2f} labels/s{ratio}  "
            f"({r['params'] / 1e6:.2f} M params, {r['masks_per_label']:.1f} masks/label)\n"
            f"    peak RSS {r['rss_peak_mib']:.0f} MiB (+{r['rss_loaded_mib'] - r['rss_base_mib']:.0f}"
            f" loading, +{r['rss_peak_mib'] - r['rss_loaded_mib']:.0f} labelling)\n"
            f"    parts: {parts}"
        )


if __name__ == "__main__":
    main()
