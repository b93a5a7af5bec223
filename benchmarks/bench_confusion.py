"""Streaming confusion matrix: the numpy path (baseline) against the torch path (CPU, and CUDA
when present), on LVIS-sized label maps (1203 classes + background, uint16 ignore).

Each path folds N random HxW (prediction, label) pairs into one matrix; the counts must agree
exactly. Prints seconds per image, the ratio to the numpy path, and the peak memory.

    python benchmarks/bench_confusion.py --images 50 --size 512 --classes 1204
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from magicseg.metrics import ConfusionMatrix

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=50)
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--classes", type=int, default=1204)
args = parser.parse_args()

ignore = 65535
rng = np.random.default_rng(0)
shape = (args.size, args.size)
pairs = []
for _ in range(4):  # 4 distinct pairs, cycled (the data does not change the cost)
    target = rng.integers(0, args.classes, shape)
    target[rng.random(shape) < 0.05] = ignore
    pairs.append((rng.integers(0, args.classes, shape), target))


def run(device: str | None) -> tuple[float, np.ndarray]:
    """Seconds per image and the final matrix; ``device`` None = numpy arrays."""
    inputs = pairs
    if device is not None:
        inputs = [
            (torch.from_numpy(p).to(device), torch.from_numpy(t).to(device)) for p, t in pairs
        ]
    cm = ConfusionMatrix(args.classes, ignore)
    start = time.perf_counter()
    for i in range(args.images):
        cm.update(*inputs[i % len(inputs)])
    matrix = cm.matrix  # flushes the device buffer
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.images, matrix


base_s, base_m = run(None)
print(f"numpy (baseline): {base_s * 1e3:.2f} ms/image")
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    run(device)  # warm-up
    s, m = run(device)
    assert np.array_equal(m, base_m), f"torch/{device} counts differ from numpy"
    print(f"torch/{device}: {s * 1e3:.2f} ms/image, {base_s / s:.2f}x numpy (counts identical)")
print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
if torch.cuda.is_available():
    print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
