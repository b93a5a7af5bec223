"""Cost of one training step of the offline segmenter per counterfactual-loss variant.

Baseline: a step without the counterfactual loss (``cf_weight: 0``), measured in the same run.
Prints seconds per step (wall and process CPU time; on a shared machine the CPU time is the
steadier figure), each with its ratio to the baseline, and the peak RSS.

    python benchmarks/bench_train_step.py [--threads 1] [--steps 10] [--batch 32] [--size 64]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from magicseg.core.config import TrainParams
from magicseg.model import build_model
from magicseg.model.base import Batch
from magicseg.training.loop import model_config


def make_batch(b: int, k: int, size: int, text_dim: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, k + 1, (b, size, size), generator=g)
    return Batch(
        images=torch.rand(b, 3, size, size, generator=g),
        cf_images=torch.rand(b, 3, size, size, generator=g),
        features=torch.randn(b, k, text_dim, generator=g),
        target=target,
        own=torch.zeros(b, k, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
    )


def time_steps(params: TrainParams, batch: Batch, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("offline", model_config(params), batch.features.shape[-1])
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr)
    for i in range(steps + 2):  # 2 warm-up steps (oneDNN primitive creation)
        if i == 2:
            wall, cpu = time.perf_counter(), time.process_time()
        loss, _ = model.compute_loss(batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, 12, args.size, 384)
    variants = [("none", 0.0, "hinge_head")] + [
        (v, 0.1, v) for v in ("hinge_head", "text_margin", "hinge_pixels", "cf_background")
    ]
    base = None
    print(f"threads={args.threads} batch={args.batch} size={args.size} steps={args.steps}")
    for name, weight, kind in variants:
        params = TrainParams(architecture="offline", cf_weight=weight, cf_loss=kind)
        wall, cpu = time_steps(params, batch, args.steps)
        base = base or (wall, cpu)
        print(
            f"{name:14s} {wall:.3f} s/step wall (x{wall / base[0]:.2f})  "
            f"{cpu:.3f} s/step cpu (x{cpu / base[1]:.2f})"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
