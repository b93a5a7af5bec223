"""Training-step cost of the clip segmenter against the vocabulary size, with and without
category random sampling.

Baseline: a step scoring every vocabulary class (``num_sampled`` = vocabulary size), measured
in the same run; the sampled step scores ``--sampled`` classes per image. Prints seconds per
step (wall and process CPU time; on a shared machine the CPU time is the steadier figure) and
the ratio all/sampled for each vocabulary size, and the peak memory (RSS; CUDA allocated).

The model is a random-initialised CLIP vision tower built from a config and saved to a
temporary directory, loaded through the real loading path (no hub). Default: a small CPU
config; ``--full``: ViT-B/16 (768 wide, 12 layers) at 512 px, decoder 3 x 512, batch 16.

    python benchmarks/train.py [--threads 1] [--steps 3] [--vocab 100,300,1203]
    python benchmarks/train.py --device cuda --full
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from magicseg.core.config import TrainParams
from magicseg.model import build_model
from magicseg.model.base import Batch
from magicseg.training.loop import make_optimizer, model_config

SMALL = {"hidden": 192, "layers": 4, "heads": 3, "size": 128, "decoder": 128, "batch": 4}
FULL = {"hidden": 768, "layers": 12, "heads": 12, "size": 512, "decoder": 512, "batch": 16}


def write_vision_tower(path: Path, cfg: dict, text_dim: int) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vc = CLIPVisionConfig(
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        intermediate_size=4 * cfg["hidden"],
        image_size=224,
        patch_size=16,
        projection_dim=text_dim,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(vc).save_pretrained(path)
    return path


def make_batch(b: int, k: int, size: int, text_dim: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, min(k, 3) + 1, (b, size, size), generator=g)
    return Batch(
        images=torch.rand(b, 3, size, size, generator=g),
        cf_images=torch.rand(b, 3, size, size, generator=g),
        features=torch.nn.functional.normalize(torch.randn(b, k, text_dim, generator=g), dim=-1),
        target=target,
        own=torch.zeros(b, k, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
    ).to(device)


def time_steps(params: TrainParams, batch: Batch, steps: int, device: torch.device):
    """(wall s/step, CPU s/step, CUDA peak GiB) of forward + backward + AdamW."""
    torch.manual_seed(0)
    model = build_model("clip", model_config(params), batch.features.shape[-1]).to(device)
    model.train()
    opt = make_optimizer(model, params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
        with autocast:
            loss, _ = model.compute_loss(batch, params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="ViT-B/16 at 512 px, batch 16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="0: the config's batch")
    ap.add_argument("--sampled", type=int, default=100)
    ap.add_argument("--vocab", default="1203", help="comma-separated vocabulary sizes")
    ap.add_argument("--text-dim", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = FULL if args.full else SMALL
    b = args.batch or cfg["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_vision_tower(Path(tmp) / "vit", cfg, args.text_dim)
        params = TrainParams.model_validate(
            {
                "architecture": "clip",
                "cf_weight": 1.0,
                "cf_loss": "hinge_head",
                "lr": 2e-5,
                "weight_decay": 0.01,
                "crop": cfg["size"],
                "clip": {"checkpoint": str(src), "decoder_dim": cfg["decoder"]},
            }
        )
        print(
            f"clip step, {device}, ViT {cfg['hidden']}x{cfg['layers']} at {cfg['size']} px, "
            f"decoder 3x{cfg['decoder']}, batch {b}, hinge_head cf, {args.steps} timed steps"
        )
        print(f"{'vocab':>6} {'scored':>7} {'wall s':>8} {'cpu s':>8} {'cuda GiB':>9}")
        for v in [int(x) for x in args.vocab.split(",")]:
            res = {}
            for k in dict.fromkeys((min(args.sampled, v), v)):
                batch = make_batch(b, k, cfg["size"], args.text_dim, device)
                res[k] = time_steps(params, batch, args.steps, device)
                w, c, g = res[k]
                print(f"{v:>6} {k:>7} {w:>8.3f} {c:>8.3f} {g:>9.2f}")
            s, a = res[min(args.sampled, v)], res[v]
            print(f"{v:>6} ratio all/sampled: wall {a[0] / s[0]:.2f}x, cpu {a[1] / s[1]:.2f}x")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
