"""Images/second of the Grounded-SAM labeler against the official Grounded-SAM flow.

Official flow (IDEA-Research/Grounded-Segment-Anything ``grounded_sam_demo.py``, here with the
``transformers`` models): one image at a time, read -> Grounding DINO (processor, forward,
``post_process_grounded_object_detection``) -> SAM image embedding -> all boxes decoded in one
call -> OR of the masks -> mask written. fp32, as the demo runs.

Ours: ``run_label`` with ``GroundedSamLabeler`` (batched detector over positives and
counterfactuals, batched SAM encoder, per-class NMS, class-indexed masks, bf16 on GPU), measured
with the counterfactual check (detector on the counterfactual too, difference agreement) and
without it. Same model weights (random init: no hub here) and the same pairs on disk.

    python benchmarks/label.py                       # CPU, small configs, 256 px (~3 min)
    python benchmarks/label.py --device cuda         # GPU: Swin-T/BERT-base GDINO + SAM ViT-H

Random weights detect tens of boxes per image where real models find a handful, so both flows
keep at most ``--max-boxes`` (default 8, best scores) per image.

Prints images/s, the ratio to the official flow, the share of time per part and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.tiny_grounded_sam import build_grounding_dino, build_sam  # noqa: E402

from magicseg.core.config import GroundedSamParams, LabelParams  # noqa: E402
from magicseg.core.devices import resolve_device, resolve_dtype  # noqa: E402
from magicseg.core.io import read_image, write_image, write_manifest, write_mask  # noqa: E402
from magicseg.label import run_label  # noqa: E402
from magicseg.label.grounded_sam import GroundedSamLabeler, Timings  # noqa: E402

NAMES = [("school bus", "owl"), ("dog",), ("red car", "traffic light"), ("cat",)]
VOCAB = sorted({n for ns in NAMES for n in ns})


def make_pairs(root: Path, n: int, h: int, w: int, seed: int = 0) -> Path:
    """``n`` generated pairs on disk (noise scene; the positive holds a bright box per class,
    the counterfactual lacks them) with a generate-stage manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        names = NAMES[i % len(NAMES)]
        scene = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        pos = scene.copy()
        for _ in names:
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            pos[y : y + h // 3, x : x + w // 3] = rng.integers(150, 255, 3)
        write_image(root / f"images/{i}.png", pos)
        write_image(root / f"cf/{i}.png", scene)
        rows.append(
            {
                "id": f"p{i:05d}",
                "prompt": " and ".join(names),
                "class_ids": [VOCAB.index(c) + 1 for c in names],
                "class_names": list(names),
                "image": f"images/{i}.png",
                "cf_image": f"cf/{i}.png",
                "oracle_mask": None,
            }
        )
    write_manifest(root, pd.DataFrame(rows))
    return root


def official_flow(
    gen: Path, out: Path, models, params: GroundedSamParams, device: str
) -> tuple[dict[str, float], float]:
    """The demo's loop, one image at a time; returns (seconds per part, boxes per image)."""
    det, det_proc, sam, sam_proc = models
    t = Timings()
    boxes = 0
    frame = pd.read_parquet(gen / "manifest.parquet")
    for row in frame.itertuples(index=False):
        with t("io", device):
            image = read_image(gen / row.image)
        h, w = image.shape[:2]
        with t("detector", device), torch.inference_mode():
            caption = " ".join(f"{n}." for n in row.class_names)
            inputs = det_proc(images=image, text=caption, return_tensors="pt").to(device)
            outputs = det(**inputs)
            result = det_proc.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=params.box_threshold,
                text_threshold=params.text_threshold,
                target_sizes=[(h, w)],
            )[0]
        if params.max_detections < len(result["scores"]):  # --max-boxes, as in ours
            top = result["scores"].argsort(descending=True)[: params.max_detections]
            result = {"boxes": result["boxes"][top], "scores": result["scores"][top]}
        mask = np.zeros((h, w), np.int64)
        boxes += len(result["boxes"])
        if len(result["boxes"]):
            with t("sam_encoder", device), torch.inference_mode():
                sam_in = sam_proc(
                    images=image, input_boxes=[result["boxes"].cpu().tolist()], return_tensors="pt"
                ).to(device)
                emb = sam.get_image_embeddings(sam_in["pixel_values"])
            with t("sam_decoder", device), torch.inference_mode():
                low = sam(
                    image_embeddings=emb,
                    input_boxes=sam_in["input_boxes"].float(),
                    multimask_output=False,
                ).pred_masks
                masks = sam_proc.image_processor.post_process_masks(
                    low.float().cpu(), sam_in["original_sizes"], sam_in["reshaped_input_sizes"]
                )[0]
                mask[masks[:, 0].any(0).numpy()] = 1  # the demo ORs all boxes into one mask
        with t("io", device):
            write_mask(out / f"masks/{row.id}.png", mask, len(VOCAB))
    return t.parts, boxes / len(frame)


def build_models(args, device: str, dtype: torch.dtype):
    det, det_proc = build_grounding_dino(args.size, max_text_len=256 if args.size == "full" else 64)
    sam, sam_proc = build_sam(args.sam if args.size == "full" else args.size)
    return det.to(device, dtype).eval(), det_proc, sam.to(device, dtype).eval(), sam_proc


def report(name: str, n: int, seconds: float, parts: dict[str, float], base: float | None):
    rate = n / seconds
    parts = dict(parts)
    parts["io+other"] = max(0.0, seconds - sum(parts.values()))
    share = ", ".join(f"{k} {100 * v / seconds:.0f}%" for k, v in sorted(parts.items()))
    ratio = f"  ratio vs official {rate / base:.2f}x" if base else ""
    print(f"{name:<28} {rate:7.2f} img/s  ({seconds:6.1f} s){ratio}\n    parts: {share}")
    return rate


def peak(device: str) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = f"peak RSS {rss:.0f} MiB (process so far)"
    if device.startswith("cuda"):
        out += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (this flow)"
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["small", "full"], default=None)
    ap.add_argument("--sam", choices=["vit_b", "vit_h"], default="vit_h")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--px", type=int, default=None, help="image side (square)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--box-threshold", type=float, default=0.3)
    ap.add_argument("--dtype", default="auto", help="our labeler's dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--max-boxes",
        type=int,
        default=8,
        help="boxes kept per image in both flows (random weights detect tens; real models a "
        "handful)",
    )
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("full" if gpu else "small")
    args.images = args.images or (64 if gpu else 16)
    args.px = args.px or (512 if args.size == "full" else 256)
    args.batch_size = args.batch_size or (8 if gpu else 4)
    torch.set_num_threads(args.threads)

    # 1. Models (random weights; shared by both flows) and pairs on disk.
    params = GroundedSamParams(
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        box_threshold=args.box_threshold,
        max_detections=args.max_boxes,
    )
    dtype = resolve_dtype(args.dtype, resolve_device(args.device, "--device"), "--dtype")
    t0 = time.perf_counter()
    fp32 = build_models(args, args.device, torch.float32)
    half = (
        fp32
        if dtype == torch.float32
        else tuple(
            copy.deepcopy(m).to(dtype) if isinstance(m, torch.nn.Module) else m for m in fp32
        )
    )
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if gpu else f'{args.threads} threads'})"
        f", {args.size} models (SAM {args.sam if args.size == 'full' else args.size}), "
        f"{args.images} pairs of {args.px}x{args.px}, batch {args.batch_size}, ours in {dtype}, "
        f"official in float32; models built in {time.perf_counter() - t0:.1f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = make_pairs(tmp / "gen", args.images, args.px, args.px)
        warm = make_pairs(tmp / "warm", min(args.batch_size, 4), args.px, args.px, seed=1)
        labelers = {
            cf: GroundedSamLabeler(params.model_copy(update={"cf_check": cf}), models=half)
            for cf in (True, False)
        }

        def ours(cf: bool, src: Path, dst: Path):
            lp = LabelParams(backend="grounded_sam", grounded_sam=labelers[cf].params)
            labelers[cf].timings.reset()
            frame = run_label(src, dst, lp, len(VOCAB), labeler=labelers[cf], batch_size=32)
            return labelers[cf].timings.parts, float(frame["box_scores"].map(len).mean())

        # 2. Warm-up (separate pairs), then the flows interleaved, ``--repeats`` times each.
        official_flow(warm, tmp / "w", fp32, params, args.device)
        ours(True, warm, tmp / "w1")
        ours(False, warm, tmp / "w2")
        flows = {
            "official (1 image at a time)": lambda d: official_flow(
                gen, d, fp32, params, args.device
            ),
            "ours, cf check": lambda d: ours(True, gen, d),
            "ours, no cf check": lambda d: ours(False, gen, d),
        }
        runs: dict[str, list] = {name: [] for name in flows}
        cpu_s: dict[str, list[float]] = {name: [] for name in flows}
        mem: dict[str, str] = {}
        for r in range(args.repeats):
            for k, (name, flow) in enumerate(flows.items()):
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                start, cpu = time.perf_counter(), time.process_time()
                parts, boxes = flow(tmp / f"out{r}{k}")
                runs[name].append((time.perf_counter() - start, dict(parts), boxes))
                cpu_s[name].append(time.process_time() - cpu)
                mem[name] = peak(args.device)

        # 3. Report: the best run per flow (the machine may be shared: the spread is printed),
        #    shares of the parts summed over runs.
        base = base_cpu = None
        for name, rs in runs.items():
            secs = min(t for t, _, _ in rs)
            total = sum(t for t, _, _ in rs)
            parts = {k: sum(p.get(k, 0.0) for _, p, _ in rs) * secs / total for k in rs[0][1]}
            rate = report(name, args.images, secs, parts, base)
            base = base or rate
            cpu_img = min(cpu_s[name]) / args.images
            base_cpu = base_cpu or cpu_img
            print(
                f"    runs {', '.join(f'{t:.1f}' for t, _, _ in rs)} s; CPU time "
                f"{cpu_img:.3f} s/img (ratio {base_cpu / cpu_img:.2f}x); "
                f"boxes decoded/image {rs[0][2]:.1f}; {mem[name]}"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
