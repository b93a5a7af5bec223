"""Training-step cost against the number of classes scored per image (category random
sampling), for the clip segmenter (``--model clip``, the default) or the offline one.

``--model clip``: baseline a step scoring every vocabulary class (``num_sampled`` = vocabulary
size), measured in the same run; the sampled step scores ``--sampled`` classes per image, for
each ``--vocab`` size. The model is a random-initialised CLIP vision tower built from a config
and saved to a temporary directory, loaded through the real loading path (no hub). Default: a
small CPU config; ``--full``: ViT-B/16 (768 wide, 12 layers) at 512 px, decoder 3 x 512, batch
16.

``--model offline``: the default offline training step as the train stage runs it (the
batch drawn by :class:`magicseg.training.data.TrainItems`, category sampling and target remapping
included, then loss, backward and AdamW; U-Net and params of the default profile, 64 px,
synthetic pairs) for each K of ``--ks`` (``all`` = every trainable class of the default
vocabulary, the baseline).

Prints seconds per step (wall and process CPU time; on a shared machine the CPU time is the
steadier figure), the ratio to the baseline, and the peak memory (RSS; CUDA allocated).

    python benchmarks/train.py [--threads 1] [--steps 3] [--vocab 100,300,1203]
    python benchmarks/train.py --device cuda --full
    python benchmarks/train.py --model offline --threads 0 [--ks 25,50,100,all] [--steps 5]
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


def offline_steps(ks: list[int], vocab_size: int, trainable: int, steps: int, rounds: int):
    """{K: (wall s/step, CPU s/step)} of the default offline training step (CPU) scoring K
    classes: the median over ``rounds`` rounds of ``steps`` steps, the Ks interleaved in each
    round so that a change of load on a shared machine hits them all alike. The batch comes
    from :class:`magicseg.training.data.TrainItems` (flip, category sampling, target remap) over
    synthetic pairs held in memory, then the loss as the loop computes it (precision and
    counterfactual share of the default), backward and AdamW."""
    import numpy as np

    from magicseg.training import data as D
    from magicseg.training.loop import _LossModule

    params = TrainParams(architecture="offline")
    rng = np.random.default_rng(0)
    n, size = 256, 64
    own = [
        tuple(int(c) for c in rng.choice(trainable, 1 + (i % 3 == 0), replace=False) + 1)
        for i in range(n)
    ]
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    cfs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.int64)
    for i, ids in enumerate(own):
        for j, c in enumerate(ids):
            masks[i, 8 + 24 * j : 28 + 24 * j, 10:40] = c

    class Memory:  # the PairIndex surface TrainItems reads, in memory
        ids = tuple(f"s{i}" for i in range(n))
        class_ids = tuple(own)
        num_classes = vocab_size

        def __len__(self) -> int:
            return n

        def read(self, i: int, counterfactual: bool = True):
            return images[i], cfs[i], masks[i].copy()

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(vocab_size, 384, generator=g), dim=-1)
    bf16 = params.precision == "bf16"
    trainable_ids = list(range(1, trainable + 1))

    class Run:
        def __init__(self, k: int) -> None:
            torch.manual_seed(0)
            model = build_model("offline", model_config(params), text.shape[1])
            if params.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.model = model.train()
            self.opt = make_optimizer(self.model, params)
            self.loss = _LossModule(
                self.model, params, lambda: torch.autocast("cpu", torch.bfloat16, enabled=bf16)
            )
            plan = D.BatchPlan(n, params.batch_size, 0)
            self.items = D.TrainItems(Memory(), plan, trainable_ids, k, params, 0)
            self.i = 0

        def step(self) -> None:
            batch = D.batch_at(self.items, self.i, text)
            self.i += 1
            if params.channels_last:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
                batch.cf_images = batch.cf_images.contiguous(memory_format=torch.channels_last)
            loss, _ = self.loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()

    runs = {}
    for k in ks:
        runs[k] = Run(k)
        for _ in range(2):  # warm-up
            runs[k].step()
    times: dict[int, list[tuple[float, float]]] = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                runs[k].step()
            times[k].append(
                ((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps)
            )
    return {k: tuple(float(np.median(x)) for x in zip(*t, strict=True)) for k, t in times.items()}


def main_offline(args) -> None:
    from magicseg.core.config import VocabularyParams
    from magicseg.core.vocabulary import build_vocabulary

    v = VocabularyParams()
    vocab = build_vocabulary(
        v.source,
        holdout_combination=v.holdout_combination,
        holdout_novel_words=v.holdout_novel_words,
    )
    trainable = len(vocab.trainable)
    ks = [trainable if x == "all" else min(int(x), trainable) for x in args.ks.split(",")]
    ks = list(dict.fromkeys(ks))
    params = TrainParams(architecture="offline")
    print(
        f"offline step, cpu, {torch.get_num_threads()} threads, 64 px, batch "
        f"{params.batch_size}, {params.cf_loss} cf, vocabulary {len(vocab)} ({trainable} "
        f"trainable), median of {args.rounds} rounds of {args.steps} steps, Ks interleaved"
    )
    res = offline_steps(
        ks + ([trainable] if trainable not in ks else []),
        len(vocab),
        trainable,
        args.steps,
        args.rounds,
    )
    base = res[trainable]
    print(f"{'K':>5} {'share':>6} {'wall s':>8} {'cpu s':>8} {'all/K wall':>10} {'all/K cpu':>9}")
    for k in ks:
        w, c = res[k]
        print(
            f"{k:>5} {k / trainable:>6.0%} {w:>8.3f} {c:>8.3f} {base[0] / w:>9.2f}x "
            f"{base[1] / c:>8.2f}x"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip", choices=["clip", "offline"])
    ap.add_argument("--ks", default="25,50,100,all", help="offline: classes scored per image")
    ap.add_argument("--rounds", type=int, default=3, help="offline: rounds, median reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="ViT-B/16 at 512 px, batch 16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: library default)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="0: the config's batch")
    ap.add_argument("--sampled", type=int, default=100)
    ap.add_argument("--vocab", default="1203", help="comma-separated vocabulary sizes")
    ap.add_argument("--text-dim", type=int, default=512)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "offline":
        main_offline(args)
        return
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
