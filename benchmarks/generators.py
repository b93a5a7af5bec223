"""Pairs/second and peak memory of the diffusers generator per model family, against SD 1.5 in
the same run (a ratio per family).

    # CPU: tiny random pipelines of every family (tests/tiny_models.py), 64 px, 4 steps
    python benchmarks/generators.py --device cpu
    # GPU: the full-size checkpoints of conf/generator/ (weights in the HF cache; SDXL-Turbo
    # only with --accept-noncommercial), at each group's size, steps and guidance
    python benchmarks/generators.py --device cuda

Each family runs in its own process (``--one``), so its peak memory is its own: on a CPU the
process's peak resident set (``ru_maxrss``; imports and the model included) and its growth
while generating; on CUDA ``torch.cuda.max_memory_allocated``. One untimed warm-up batch, then
``--pairs`` pairs in batches of ``--batch-size`` (``images_per_call: auto``), timed once; the
hours for 100,000 pairs follow from pairs/s. Also the process's CPU seconds per pair (all its
threads): on a CPU shared with other jobs wall time measures the neighbours too, CPU time much
less so. The tiny models say how the families' pipelines
compare in overhead at equal toy widths, not how the real models compare: FLUX's T5 encodes
512 tokens, klein's Qwen runs 28 layers, whatever the width.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

TINY = {
    # family: (builder in tests/tiny_models.py, guidance)
    "sd15": ("tiny_sd_pipeline_dir", 5.0),
    "sdxl": ("tiny_sdxl_pipeline_dir", 5.0),
    "sd3": ("tiny_sd3_pipeline_dir", 5.0),
    "flux": ("tiny_flux_pipeline_dir", 0.0),
    "flux2": ("tiny_flux2_klein_pipeline_dir", 0.0),
}
FULL = {  # family: the conf/generator group of its full-size checkpoint
    "sd15": "sd15",
    "sdxl": "sdxl-turbo",
    "sd3": "sd35-medium",
    "flux": "flux-schnell",
    "flux2": "flux2-klein",
}


def one(family: str, args: argparse.Namespace) -> dict:
    """Build (tiny) or load (full) one family's generator, warm up, time ``args.pairs``."""
    import torch
    import yaml

    from magicseg.core.config import DiffusersGeneratorParams, GenerateParams
    from magicseg.generate.base import PromptRecord
    from magicseg.generate.diffusers import DiffusersPairGenerator

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        from tests import tiny_models

        builder, guidance = TINY[family]
        model = getattr(tiny_models, builder)(Path(tempfile.mkdtemp(prefix=f"gen-{family}-")))
        opts = {"checkpoint": str(model), "steps": args.steps, "guidance": guidance}
        opts["scheduler"] = "dpm++" if family in ("sd15", "sdxl") else "default"
        size = args.size
    else:
        group = yaml.safe_load((ROOT / "conf/generator" / f"{FULL[family]}.yaml").read_text())
        opts = dict(group["generate"]["diffusers"])
        opts["accept_noncommercial"] = args.accept_noncommercial
        size = group["generate"]["height"]
    params = GenerateParams(
        backend="diffusers",
        height=size,
        width=size,
        batch_size=args.batch_size,
        diffusers=DiffusersGeneratorParams(**opts, device=args.device),
    )
    gen = DiffusersPairGenerator(params)
    records = [
        PromptRecord(f"p{i}", f"a photo of a red ball number {i} on the beach",
                     "a photo of the beach", (1,), ("red ball",), seed=i)
        for i in range(args.pairs + args.batch_size)
    ]  # fmt: skip
    gen.check(records)
    gen.generate(records[: args.batch_size])  # warm-up (kernel selection, lazy init)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    todo = records[args.batch_size :]
    for i in range(0, len(todo), args.batch_size):
        gen.generate(todo[i : i + args.batch_size])
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    out = {
        "family": family,
        "model": opts["checkpoint"] if args.device == "cuda" else f"tiny {family}",
        "pipeline": type(gen.pipe).__name__,
        "params_M": round(sum(p.numel() for p in gen.denoiser.parameters()) / 1e6, 3),
        "size": size,
        "steps": params.diffusers.steps,
        "guidance": params.diffusers.guidance,
        "pairs": args.pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(args.pairs / seconds, 4),
        "cpu_s_per_pair": round(cpu_seconds / args.pairs, 3),
        "hours_per_100k_pairs": round(100_000 / (args.pairs / seconds) / 3600, 2),
    }
    if args.device == "cuda":
        out["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        out["device_name"] = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_rss_MB"] = round(peak, 1)
        out["rss_growth_MB"] = round(peak - rss_before, 1)
        out["threads"] = args.threads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--families", nargs="+", default=list(TINY), choices=list(TINY))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="CPU tiny models: image side")
    parser.add_argument("--steps", type=int, default=4, help="CPU tiny models: steps")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch threads")
    parser.add_argument("--accept-noncommercial", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    if args.device == "cuda" and not _cuda():
        sys.exit("--device cuda: no CUDA device here")

    rows = []
    for family in ["sd15"] + [f for f in args.families if f != "sd15"]:
        if args.device == "cuda" and family == "sdxl" and not args.accept_noncommercial:
            print("skipped sdxl (SDXL-Turbo is non-commercial: --accept-noncommercial)")
            continue
        cmd = [sys.executable, __file__, "--one", family] + sys.argv[1:]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{family}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)

    base = next((r for r in rows if r["family"] == "sd15"), None)
    mem = "peak_gpu_GB" if args.device == "cuda" else "peak_rss_MB"
    print(
        f"\n| family | pipeline | denoiser M | pairs/s | x SD 1.5 | h / 100k pairs | "
        f"CPU s / pair | x SD 1.5 (CPU time) | {mem} |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["pairs_per_s"] / base["pairs_per_s"] if base else float("nan")
        cpu = base["cpu_s_per_pair"] / r["cpu_s_per_pair"] if base else float("nan")
        r["ratio_vs_sd15"], r["cpu_ratio_vs_sd15"] = round(ratio, 3), round(cpu, 3)
        print(
            f"| {r['family']} | {r['pipeline']} | {r['params_M']} | {r['pairs_per_s']:.3f} | "
            f"{ratio:.2f} | {r['hours_per_100k_pairs']} | {r['cpu_s_per_pair']} | {cpu:.2f} | "
            f"{r[mem]} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
