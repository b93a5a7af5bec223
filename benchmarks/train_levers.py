"""Offline training step time per speed lever, alone and combined, against today's step.

Baseline (``today``): the offline recipe as it trained before issue 13 (fp32, channels-last,
the counterfactual of every image through the whole model, batch 32 at 64 px, every sample
held in memory), measured in the same run. ``streamed`` reads the samples from disk as the loop
now does (in the training process); each lever then changes one ``train.*`` param of it:

    bf16            precision: bf16 (autocast; AVX-512 BF16 / AMX where the CPU has them)
    contiguous      channels_last: false (to show what channels-last gives)
    compile         compile: true (torch.compile, inductor; the compile itself not timed)
    cf_half         cf_fraction: 0.5 (half the counterfactuals pass)
    cf_quarter      cf_fraction: 0.25
    batch64         batch_size: 64 (per-image cost of larger, fewer steps)
    workers1        num_workers: 1 (reading and augmenting overlapped with compute)
    default         the levers chosen for the default, together (bf16, cf_fraction 0.25)

Rounds are interleaved (every variant once per round) and the best round kept, since the
machine may be shared; wall and process CPU seconds per step and per image are printed, with
the ratio to the baseline, the model FLOPs of a step and the share of the CPU's peak
(``--peak-gflops``; see the README for the assumed figure), and the peak RSS.

    python benchmarks/train_levers.py [--threads 2] [--steps 8] [--rounds 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from magicseg.core.config import TrainParams
from magicseg.core.stage import load_vocabulary
from magicseg.model import build_model
from magicseg.training import data as D
from magicseg.training.loop import _LossModule, make_optimizer, model_config

BASE = {
    "architecture": "offline",
    "precision": "fp32",
    "channels_last": True,
    "cf_fraction": 1.0,
    "num_workers": 0,
}
VARIANTS = {
    "today": {"_memory": True},
    "streamed": {},
    "bf16": {"precision": "bf16"},
    "contiguous": {"channels_last": False},
    "compile": {"compile": True},
    "cf_half": {"cf_fraction": 0.5},
    "cf_quarter": {"cf_fraction": 0.25},
    "batch64": {"batch_size": 64},
    "workers1": {"num_workers": 1},
    "default": {"precision": "bf16", "cf_fraction": 0.25},
}


def make_dataset(
    root: Path, n: int, size: int, limit: int | None = None, combination: int = 16, novel: int = 2
) -> tuple[Path, Path]:
    """``n`` procedural pairs with exact masks in a filter-like layout (vocabulary, filter), one
    class an image, over the first ``limit`` catalogue classes (all: None) with ``combination``
    held-out combinations and ``novel`` novel words drawn at seed 0."""
    from magicseg.core.config import ProceduralGeneratorParams
    from magicseg.core.io import write_image, write_manifest, write_mask
    from magicseg.core.vocabulary import build_vocabulary
    from magicseg.generate.base import PromptRecord
    from magicseg.generate.procedural import ProceduralGenerator

    vocab = build_vocabulary(
        "procedural",
        holdout_combination=combination,
        holdout_novel_words=novel,
        limit=limit,
        seed=0,
    )
    write_manifest(root / "vocabulary", vocab.to_frame())
    gen = ProceduralGenerator(ProceduralGeneratorParams(), size, size)
    rows = []
    for i in range(n):
        ids = (vocab.trainable[i % len(vocab.trainable)],)
        names = tuple(vocab.display[c - 1] for c in ids)
        rec = PromptRecord(f"s{i:05d}", f"a photo of {names[0]}", "", ids, names, 1000 + i)
        pair = gen.render(rec)
        write_image(root / f"images/{rec.id}.png", pair.positive)
        write_image(root / f"cf/{rec.id}.png", pair.counterfactual)
        write_mask(root / f"masks/{rec.id}.png", pair.oracle_mask, len(vocab))
        rows.append(
            {
                "id": rec.id,
                "class_ids": list(ids),
                "image": f"../images/{rec.id}.png",
                "cf_image": f"../cf/{rec.id}.png",
                "mask": f"../masks/{rec.id}.png",
            }
        )
    write_manifest(root / "filter", pd.DataFrame(rows))
    return root / "filter", root / "vocabulary"


class InMemory:
    """A :class:`PairIndex` whose samples were read into memory first."""

    def __init__(self, index: D.PairIndex, samples: list) -> None:
        self.index = index
        self.samples = samples

    def __getattr__(self, name: str):
        return getattr(self.index, name)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int, counterfactual: bool = True):
        image, cf, mask = self.samples[i]
        return image, cf, mask.copy()


class Runner:
    """One variant: its model, optimiser and data iterator, stepping on demand."""

    def __init__(
        self,
        params: TrainParams,
        filter_dir: Path,
        vocab_dir: Path,
        text_dim: int,
        in_memory: bool = False,
    ):
        vocab = load_vocabulary(vocab_dir)
        index = D.read_index(filter_dir, vocab)
        if in_memory:  # every sample read once, up front (the loader before issue 13)
            samples = [index.read(i) for i in range(len(index))]
            index = InMemory(index, samples)
        self.params = params
        torch.manual_seed(0)
        self.model = build_model("offline", model_config(params), text_dim)
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = make_optimizer(self.model, params)
        if params.compile:
            self.model.compile()
        bf16 = params.precision == "bf16"
        self.wrapped = _LossModule(
            self.model, params, lambda: torch.autocast("cpu", torch.bfloat16, enabled=bf16)
        )
        b = params.batch_size
        items = D.TrainItems(
            index, D.BatchPlan(len(index), b, 0), vocab.trainable, params.num_sampled, params, 0
        )
        loader = D.loader(items, D.StepBatches(0, 10**6, b, 0, 1), params.num_workers, False)
        self.batches = iter(loader)
        self.features = torch.nn.functional.normalize(torch.randn(len(vocab), text_dim), dim=-1)

    def step(self) -> None:
        batch = D.to_batch(next(self.batches), self.features)
        if self.params.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            batch.cf_images = batch.cf_images.contiguous(memory_format=torch.channels_last)
        loss, _ = self.wrapped(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flops(self) -> float:
        """Model FLOPs of one step (forward + backward), counted by torch."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, oneDNN)")
    ap.add_argument("--samples", type=int, default=512, help="procedural pairs made (no --data)")
    ap.add_argument("--data", type=Path, help="a project's data/ (filter and vocabulary inside)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--peak-gflops",
        type=float,
        default=2 * 2.6 * 64,
        help="fp32 peak of the CPU: cores x GHz x FLOP/cycle (2 AVX-512 FMA units: 64)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.data:
        filter_dir, vocab_dir = args.data / "filter", args.data / "vocabulary"
    else:
        filter_dir, vocab_dir = make_dataset(Path(tmp.name), args.samples, 64)
    names = args.variants.split(",")
    runners = {}
    for name in names:
        over = dict(VARIANTS[name])
        in_memory = over.pop("_memory", False)
        p = TrainParams.model_validate(BASE | over)
        runners[name] = Runner(p, filter_dir, vocab_dir, 384, in_memory)
        for _ in range(args.warmup):
            runners[name].step()
    flops = {n: runners[n].flops() for n in names}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name in names:
            r = runners[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                r.step()
            wall = (time.perf_counter() - wall) / args.steps
            cpu = (time.process_time() - cpu) / args.steps
            prev = best.get(name, (np.inf, np.inf))
            best[name] = (min(prev[0], wall), min(prev[1], cpu))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"threads={args.threads} steps={args.steps} rounds={args.rounds} (best round)")
    print(f"load: {load}")
    cores = os.cpu_count() or 1
    peak = args.peak_gflops * min(args.threads, cores) / cores  # the share of the cores used
    print(
        f"cpu: {cores} logical; assumed fp32 peak {args.peak_gflops:.0f} GFLOP/s, "
        f"{peak:.0f} for {args.threads} thread(s) (%peak: model FLOPs / time / that)"
    )
    base = best[names[0]]
    b0 = runners[names[0]].params.batch_size
    print(
        f"{'variant':12s} {'s/step':>8s} {'x':>6s} {'cpu s/step':>10s} {'x':>6s} "
        f"{'ms/image':>8s} {'x':>6s} {'GFLOP/step':>10s} {'%peak':>6s}"
    )
    for name in names:
        wall, cpu = best[name]
        b = runners[name].params.batch_size
        per_img, base_img = wall / b * 1e3, base[0] / b0 * 1e3
        gf = flops[name] / 1e9
        share = 100 * gf / wall / peak
        print(
            f"{name:12s} {wall:8.3f} {base[0] / wall:6.2f} {cpu:10.3f} {base[1] / cpu:6.2f} "
            f"{per_img:8.2f} {base_img / per_img:6.2f} {gf:10.2f} {share:6.1f}"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB (x = speed-up over {names[0]}; higher is faster)")


if __name__ == "__main__":
    main()
