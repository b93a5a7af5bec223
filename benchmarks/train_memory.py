"""Peak memory of training on N and 4N samples: the streamed data (items read from disk as
they are needed) against the data loaded in memory first (what the loop did before issue 13:
every kept sample in RAM, then stacked into a second copy).

Each case runs in a fresh process (its peak RSS is its own): ``stream`` trains one epoch of the
samples through :func:`magicseg.training.loop.train` (every sample read once); ``memory``
reads every sample into lists and stacks them as the old loader did, without training. The
ratio 4N / N is the figure to watch: streamed, it stays near 1 (target <= 1.2).

    python benchmarks/train_memory.py [--samples 500] [--size 64] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from magicseg.core.config import TrainParams
    from magicseg.core.io import read_manifest, write_manifest
    from magicseg.core.stage import load_vocabulary

    torch.set_num_threads(1)
    root = Path(args.data)
    frame = read_manifest(root / "filter").iloc[: args.limit]
    sub = root / f"filter-{args.limit}"
    write_manifest(sub, pd.DataFrame(frame).reset_index(drop=True))
    if args.mode == "stream":
        from magicseg.training.loop import train

        params = TrainParams.model_validate(
            {
                "steps": math.ceil(args.limit / 32),
                "batch_size": 32,
                "val_fraction": 0.05,
                "val_every": 10**6,
                "logger": "none",
                "num_workers": args.workers,
                "num_threads": 1,
                "offline": {"width": 8, "depth": 2, "embed_dim": 16},
            }
        )
        train(sub, root / "vocabulary", params, 0, Path(args.data) / f"out-{args.limit}")
    else:
        from magicseg.core.io import read_image, read_mask

        vocab = load_vocabulary(root / "vocabulary")
        images, cfs, masks = [], [], []
        for row in frame.itertuples(index=False):
            images.append(read_image(sub / row.image))
            cfs.append(read_image(sub / row.cf_image))
            masks.append(read_mask(sub / row.mask).astype(np.int32))
        stacked = [np.stack(images), np.stack(cfs), np.stack(masks)]
        assert len(vocab) and all(len(x) == args.limit for x in stacked)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mib": rss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=500, help="N (the larger run has 4N)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=0, help="train.num_workers of the stream")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from train_levers import make_dataset

    n = args.samples
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), 4 * n, args.size)
        print(f"{n} and {4 * n} procedural pairs at {args.size} px (peak RSS of a fresh process)")
        results = {}
        for mode in ("stream", "memory"):
            for limit in (n, 4 * n):
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--data", tmp,
                       "--limit", str(limit), "--workers", str(args.workers)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                results[mode, limit] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]
            a, b = results[mode, n], results[mode, 4 * n]
            print(f"{mode:7s} N: {a:7.0f} MiB   4N: {b:7.0f} MiB   ratio 4N/N: {b / a:.2f}")


if __name__ == "__main__":
    main()
