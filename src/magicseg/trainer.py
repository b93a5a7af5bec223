"""Resumable, multi-process training through ``accelerate`` (DDP), for any registered model.

:func:`magicseg.train.train` hands over to :func:`fit` for ``train.architecture: clip`` and whenever
it runs under a launcher (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``, SLURM); the
same code runs as one CPU process. It reuses the loop's pieces (:class:`BatchSampler` with
category sampling, :func:`compute_loss`, :func:`validate`, loggers, :func:`save_checkpoint`)
and adds what the paper's recipe needs:

1. Global batches: every rank draws the same global batch (``train.batch_size``) from the same
   seeded sampler, augments it with the same generator and keeps its contiguous slice, so N
   processes x B/N images give the same gradients as one process with B (DDP averages the
   per-rank means; the clip losses are per-image means, so the average is exact).
2. Augmentations (clip): random resize 0.5-2.0, random crop ``train.clip.crop`` (padded with
   ignore), photometric distortion (brightness, contrast, saturation), the same geometry and
   colours for the positive and its counterfactual; the sampler already flips.
3. AdamW, weight decay on >= 2-d weights only, lr = ``train.lr`` x ``train.clip.lr_multiplier``
   for the trained parts (all of them: CLIP itself is frozen), linear warm-up
   (``train.clip.warmup`` steps; offline: 5% of the steps) then polynomial decay (power 0.9).
4. bf16 autocast on GPU (``accelerate``'s mixed precision), fp32 on CPU.
5. Resumable state ``<out_dir>/state.pt`` (every ``checkpoint_every`` steps, default 1000,
   and at the end):
   the trained parameters and buffers (frozen CLIP weights are rebuilt from their source),
   optimiser, scheduler, step, the sampler's and augmenter's RNG states and the loss window.
   A rerun with the same params continues where it stopped and gives the same loss sequence
   as an uninterrupted run. All processes must see ``out_dir`` (a shared filesystem across
   nodes).

Launch (one process per GPU; several nodes: the usual ``--num_machines``/``--machine_rank``/
``--main_process_ip`` of ``accelerate launch``, or ``torchrun --nnodes``), e.g.

    accelerate launch --num_processes 8 <the train stage command>
    torchrun --nproc_per_node 2 ...          # CPU: gloo; the same code as one process

Not done: SyncBatchNorm for the offline model (its BatchNorm statistics stay per rank, so its
multi-process runs are close to, not equal to, one process), gradient accumulation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from magicseg.core.config import TrainParams, params_to_dict
from magicseg.core.devices import resolve_device
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import atomic_path
from magicseg.core.seeding import derive_seed
from magicseg.core.stage import load_vocabulary
from magicseg.model import TextEncoder, build_model, build_text_encoder, save_checkpoint
from magicseg.model import text_encoder_name as _text_encoder_name

STATE = "state.pt"
PARTS = ("loss", "pixel_loss", "cf_loss")


def launched_world_size() -> int:
    """Processes of the launch (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
def augment(batch, crop: int, gen: torch.Generator, scale: tuple[float, float] = (0.5, 2.0)):
    """Random resize (``scale`` x the image size), random crop ``crop`` x ``crop`` (pad: image
    0, target ignore), photometric distortion; the same draws for an image and its
    counterfactual. ``batch``: a :class:`magicseg.train.Batch` (Bx3xHxW in [0, 1], BxHxW
    target); returns a new Batch of Bx3xcropxcrop. All draws come from ``gen`` (CPU)."""
    from magicseg.model.losses import IGNORE
    from magicseg.train import Batch

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    images, cfs, targets = [], [], []
    for img, cf, tgt in zip(batch.images, batch.cf_images, batch.target, strict=True):
        # 1. Random resize.
        h, w = img.shape[-2:]
        s = u(*scale)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        pair = F.interpolate(torch.stack([img, cf]), size=size, mode="bilinear", antialias=True)
        t = F.interpolate(tgt[None, None].float(), size=size, mode="nearest")[0, 0].long()
        # 2. Pad to at least crop, then a random crop.
        ph, pw = max(0, crop - size[0]), max(0, crop - size[1])
        if ph or pw:
            pair = F.pad(pair, (0, pw, 0, ph), value=0.0)
            t = F.pad(t, (0, pw, 0, ph), value=IGNORE)
        y = int(torch.randint(0, pair.shape[-2] - crop + 1, (), generator=gen))
        x = int(torch.randint(0, pair.shape[-1] - crop + 1, (), generator=gen))
        pair, t = pair[..., y : y + crop, x : x + crop], t[y : y + crop, x : x + crop]
        # 3. Photometric distortion (each with probability 0.5), the same for both images.
        if u(0, 1) < 0.5:
            pair = pair + u(-32 / 255, 32 / 255)
        if u(0, 1) < 0.5:
            c = u(0.5, 1.5)
            pair = (pair - pair.mean(dim=(1, 2, 3), keepdim=True)) * c + pair.mean(
                dim=(1, 2, 3), keepdim=True
            )
        if u(0, 1) < 0.5:
            gray = (pair * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            pair = gray + (pair - gray) * u(0.5, 1.5)
        pair = pair.clamp(0, 1)
        images.append(pair[0])
        cfs.append(pair[1])
        targets.append(t)
    return Batch(
        torch.stack(images), torch.stack(cfs), batch.features, torch.stack(targets), batch.own
    )


def _slice(batch, rank: int, world: int):
    """This rank's contiguous share of a global batch."""
    from magicseg.train import Batch

    n = batch.images.shape[0] // world
    return Batch(*(t[rank * n : (rank + 1) * n] for t in vars(batch).values()))


# --------------------------------------------------------------------------------------------
# optimiser and schedule
# --------------------------------------------------------------------------------------------
def lr_scale(params: TrainParams) -> float:
    """The multiplier of ``train.lr`` for the trained parts (clip: ``lr_multiplier``)."""
    return params.clip.lr_multiplier if params.architecture == "clip" else 1.0


def warmup_steps(params: TrainParams) -> int:
    if params.architecture == "clip":
        return min(params.clip.warmup, params.steps - 1)
    return max(1, params.steps // 20)


def poly_lambda(steps: int, warmup: int, power: float = 0.9):
    """Linear warm-up over ``warmup`` steps, then (1 - t)^power decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return (1 - (step - warmup) / max(1, steps - warmup)) ** power

    return f


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-d ones (norms, biases)."""
    lr = params.lr * lr_scale(params)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


class _LossModule(nn.Module):
    """Wraps a segmenter so one DDP forward computes the whole loss (positive, counterfactual
    and their encoder passes), whatever calls the segmenter makes inside."""

    def __init__(self, model: nn.Module, params: TrainParams) -> None:
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from magicseg.train import compute_loss

        total, parts = compute_loss(self.model, batch, self.params)
        # the parts as one tensor, so they can be averaged over ranks
        return total, torch.tensor([parts[k] for k in PARTS], device=total.device)


# --------------------------------------------------------------------------------------------
# resumable state
# --------------------------------------------------------------------------------------------
def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all persistent buffers (CPU)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}


def save_state(path: Path, model, opt, sched, step: int, sampler, gen, window, config) -> None:
    blob = {
        "step": step,
        "model": _trained_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "sampler_rng": sampler.rng.bit_generator.state,
        "sampler_order": sampler._order.copy(),
        "augment_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "window": window,
        "config": config,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_state(path: Path, model, opt, sched, sampler, gen, config) -> tuple[int, list]:
    """Restore what :func:`save_state` wrote; returns (step, loss window)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob["config"] != config:
        raise ConfigError(
            f"{path}: saved with other training params; delete it or use another out dir"
        )
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise DataError(f"{path}: state does not match the model ({unexpected or missing})")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    sampler.rng.bit_generator.state = blob["sampler_rng"]
    sampler._order = np.asarray(blob["sampler_order"])
    gen.set_state(blob["augment_rng"])
    torch.set_rng_state(blob["torch_rng"])
    return int(blob["step"]), list(blob["window"])


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def fit(
    filter_dir: str | Path,
    vocab_dir: str | Path,
    params: TrainParams,
    seed: int,
    out_dir: str | Path,
    live_dir: str | Path | None = None,
    text_encoder: TextEncoder | None = None,
    checkpoint_every: int = 1000,
    stop_at: int | None = None,
    history: list[float] | None = None,
) -> dict:
    """Train ``params.architecture`` like :func:`magicseg.train.train` (same inputs, outputs and
    metrics), on every process of the launch; resumes from ``<out_dir>/state.pt``.

    ``checkpoint_every``: steps between resumable states (0: only at the end; the stage uses
    the default, 1000 steps, about 5% of the paper's run); ``stop_at``:
    stop after that many steps (with a state, no model.pt: an interrupted run); ``history``:
    a list that receives every step's global loss (tests).
    """
    from accelerate import Accelerator

    from magicseg.train import (
        CHECKPOINT,
        BatchSampler,
        load_split,
        make_logger,
        model_config,
        validate,
    )

    # 1. Inputs, checked before any work; the accelerator (process group, device, precision).
    t0 = time.perf_counter()
    vocab = load_vocabulary(vocab_dir)
    device = resolve_device(params.device, "train.device")
    world = launched_world_size()
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    acc = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if device.type == "cuda" else "no",
    )
    device = acc.device
    cfg = model_config(params)
    encoder = text_encoder or build_text_encoder(_text_encoder_name(params.architecture, cfg), cfg)
    train_data, val_data = load_split(filter_dir, vocab, params.val_fraction, seed)
    global_batch = min(params.batch_size, len(train_data))  # as the sampler clamps it
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size: {global_batch} images per step do not split over {world} processes"
        )

    # 2. Frozen text features of the whole vocabulary, once.
    text_features = encoder.encode(list(vocab.names)).float()

    # 3. Model, optimiser, schedule, sampler, augmenter: seeded, identical on every rank.
    torch.manual_seed(derive_seed(seed, "train.init"))
    model = build_model(params.architecture, cfg, encoder.dim)
    model.train()
    opt = make_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(params.steps, warmup_steps(params)))
    sampler = BatchSampler(train_data, text_features, vocab.trainable, params, seed)
    gen = torch.Generator().manual_seed(derive_seed(seed, "train.augment"))
    out_dir = Path(out_dir)
    state_path = out_dir / STATE
    run_config = {"train": params_to_dict(params), "seed": seed}
    start, window = 0, []
    if state_path.is_file():
        start, window = load_state(state_path, model, opt, sched, sampler, gen, run_config)
    wrapped = acc.prepare(_LossModule(model, params))
    logger = (
        make_logger(params.logger, live_dir, params_to_dict(params) | {"seed": seed})
        if acc.is_main_process
        else make_logger("none", None, {})
    )

    # 4. The loop.
    val = {"val_miou": float("nan"), "val_pixel_acc": float("nan")}
    end = params.steps if stop_at is None else min(stop_at, params.steps)
    bar = tqdm(
        range(start, end), desc=f"train ({params.architecture})", disable=not acc.is_main_process
    )
    for step in bar:
        batch = sampler.next()
        if params.architecture == "clip":
            batch = augment(batch, params.clip.crop, gen)
        batch = _slice(batch, acc.process_index, acc.num_processes).to(device)
        loss, detached = wrapped(batch)
        if not torch.isfinite(loss):
            raise DataError(f"train: loss became {loss.item()} at step {step} (lower train.lr)")
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        parts = acc.reduce(detached.float(), reduction="mean").tolist()
        parts = dict(zip(PARTS, parts, strict=True))
        if history is not None:
            history.append(parts["loss"])
        window = [*window[-(params.log_every - 1) :], parts]
        done = step + 1
        if checkpoint_every and done % checkpoint_every == 0 and done < end:
            if acc.is_main_process:
                save_state(state_path, model, opt, sched, done, sampler, gen, window, run_config)
            acc.wait_for_everyone()
        last = done == params.steps
        if acc.is_main_process and (done % params.log_every == 0 or last):
            logs = {f"train/{k}": float(np.mean([w[k] for w in window])) for k in PARTS}
            logs["train/lr"] = sched.get_last_lr()[0]
            if len(val_data) and (done % params.val_every == 0 or last):
                # clip scores the whole vocabulary at full resolution: small batches
                vb = 2 if params.architecture == "clip" else 64
                cm = validate(model, val_data, text_features, device, batch_size=vb)
                val = {
                    "val_miou": cm.miou(np.flatnonzero(cm.present()[1:]) + 1),
                    "val_pixel_acc": cm.pixel_accuracy(),
                }
                logs["val/miou"] = val["val_miou"]
            logger.log(logs, done)
            bar.set_postfix(loss=f"{logs['train/loss']:.3f}")
    logger.close()

    # 5. Resumable state; at the end, the checkpoint and metrics.
    if acc.is_main_process:
        save_state(state_path, model, opt, sched, end, sampler, gen, window, run_config)
    acc.wait_for_everyone()
    metrics = {
        "steps": end,
        "samples_train": len(train_data),
        "samples_val": len(val_data),
        **{k: round(float(np.mean([w[k] for w in window])), 5) for k in PARTS if window},
        **{k: (round(v, 5) if np.isfinite(v) else None) for k, v in val.items()},
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "num_trained_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "processes": acc.num_processes,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if end == params.steps and acc.is_main_process:
        save_checkpoint(
            out_dir / CHECKPOINT,
            model,
            params.architecture,
            cfg,
            encoder.name,
            list(vocab.names),
            sorted(vocab.holdout),
            train_data.images.shape[1:3],
            meta={"train": params_to_dict(params), "seed": seed, "metrics": metrics},
        )
    acc.wait_for_everyone()
    return metrics
