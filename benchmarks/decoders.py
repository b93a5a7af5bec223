"""Training-step cost of the published ATM decoder (``train.clip.decoder: atm``) against this
project's query decoder, on the same random CLIP vision tower and the same batch.

Baseline: the query decoder (loss at 1/4, deep supervision), measured in the same run. The
variants: atm with the loss at 1/4, and atm as published (loss at full resolution, last layer
only, ``vpt_style: zegclip``). Prints seconds per step (wall and process CPU time; on a shared
machine the CPU time is the steadier figure), each with its ratio to the baseline, the CUDA
peak memory per variant and the process's peak RSS.

Default: a small CPU config; ``--full``: ViT-B/16 (768 wide, 12 layers) at 512 px, decoder
3 x 512, batch 16, K = 100 classes per image, the counterfactual in the same pass
(``hinge_head``), bf16 autocast on CUDA.

    python benchmarks/decoders.py [--threads 1] [--steps 3] [--batch 0] [--classes 100]
    python benchmarks/decoders.py --device cuda --full
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from magicseg.core.config import TrainParams  # noqa: E402
from train import FULL, SMALL, make_batch, time_steps, write_vision_tower  # noqa: E402

VARIANTS = {
    "query (baseline)": {"decoder": "query"},
    "atm, loss at 1/4": {"decoder": "atm"},
    "atm as published": {
        "decoder": "atm",
        "loss_stride": 1,
        "deep_supervision": False,
        "vpt_style": "zegclip",
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="ViT-B/16 at 512 px, batch 16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="0: the config's batch")
    ap.add_argument("--classes", type=int, default=100, help="classes scored per image")
    ap.add_argument("--text-dim", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = FULL if args.full else SMALL
    b = args.batch or cfg["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_vision_tower(Path(tmp) / "vit", cfg, args.text_dim)
        batch = make_batch(b, args.classes, cfg["size"], args.text_dim, device)
        print(
            f"clip step, {device}, ViT {cfg['hidden']}x{cfg['layers']} at {cfg['size']} px, "
            f"decoder 3x{args.text_dim}, batch {b}, K {args.classes}, hinge_head cf, "
            f"{args.steps} timed steps"
        )
        print(f"{'variant':<18} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'GiB':>6}")
        base = None
        for name, clip in VARIANTS.items():
            params = TrainParams.model_validate(
                {
                    "architecture": "clip",
                    "cf_weight": 1.0,
                    "cf_loss": "hinge_head",
                    "lr": 2e-5,
                    "weight_decay": 0.01,
                    "crop": cfg["size"],
                    "clip": {"checkpoint": str(src), "decoder_dim": args.text_dim, **clip},
                }
            )
            w, c, g = time_steps(params, batch, args.steps, device)
            base = base or (w, c)
            print(
                f"{name:<18} {w:>8.3f} {c:>8.3f} {w / base[0]:>7.2f} {c / base[1]:>7.2f} {g:>6.2f}"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
