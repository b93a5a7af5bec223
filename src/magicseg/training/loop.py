"""The ``train`` stage: one ``accelerate`` loop for every registered model (one process is world
size 1; ``torchrun``/``accelerate launch``/SLURM run the same code on N processes).

What differs between models is a param (``train.*``, per-profile defaults), never a branch on
the architecture; each model owns its loss (``model.compute_loss(batch, params)``).

1. Data (:mod:`magicseg.training.data`): the manifest is indexed, pixels are read item by item
   by DataLoader workers. Every rank computes the same global batch plan (which samples, flips,
   sampled classes, augmentation: functions of (seed, stream, step, position)) and takes its
   contiguous slice, so N processes x B/N images see what one process with B sees; the losses
   are normalised over all processes (:mod:`magicseg.model.losses`) and the offline model's
   BatchNorm statistics span them (:class:`magicseg.model.offline.GlobalBatchNorm2d`).
2. Optimiser and schedule (:func:`make_optimizer`, :func:`lr_factor`): AdamW at ``lr`` x
   ``lr_multiplier`` for every trained parameter, weight decay on ``weight_decay_rule``
   parameters; linear warm-up from ``warmup_ratio``, then cosine or poly to ``min_lr_ratio``.
3. Precision, layout and stability (:mod:`magicseg.training.stability`): ``precision`` (bf16
   autocast on CPU or CUDA, weights fp32; ``auto``: fp32 on a CPU), ``channels_last``,
   ``compile``, ``deterministic`` (deterministic kernels), ``ema`` (an average of the weights,
   used for validation and the saved model).
4. Resumable state (:func:`run_key`): ``<state_dir>/<run key>/state.pt``, written atomically
   every ``checkpoint_every`` steps and at the end: step, trained parameters and buffers,
   optimiser, scheduler, torch RNG, the loss window and the logged records. The key hashes
   everything that determines the run (params, seed, data, code, world size, threads), so a
   kill (SIGKILL of ``dvc repro``) and a re-run continue to the same ``model.pt`` bytes, and a
   changed input starts over. ``dvc repro`` deletes the stage's outputs, not this directory.
   A re-run of a finished run (``dvc repro --force``) rebuilds the outputs from its final
   state without training; delete the directory to train again.
5. Validation (:func:`validate`): a fixed subset of the validation split
   (``val_samples``), every rank scoring its shard, confusion matrices summed.
6. Outputs: ``<out_dir>/model.pt`` (:func:`magicseg.model.save_checkpoint`) and the metrics
   dict, both free of wall-clock figures (same params, data and threads: same bytes);
   timings go to ``<state_dir>/<run key>/timing.json`` (not tracked) and are printed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from magicseg.core.config import TrainParams, params_to_dict
from magicseg.core.devices import resolve_device
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import atomic_path, write_json
from magicseg.core.seeding import derive_seed
from magicseg.core.stage import load_vocabulary
from magicseg.metrics import ConfusionMatrix
from magicseg.model import TextEncoder, build_model, build_text_encoder, save_checkpoint
from magicseg.model import text_encoder_name as _text_encoder_name
from magicseg.model.losses import IGNORE
from magicseg.training import data as D
from magicseg.training.loggers import make_logger
from magicseg.training.stability import Ema, autocast_dtype, maybe_applied, set_deterministic

CHECKPOINT = "model.pt"
STATE = "state.pt"
TIMING = "timing.json"
PARTS = ("loss", "pixel_loss", "cf_loss")
NOT_IN_KEY = ("logger", "num_workers", "checkpoint_every")
"""Params that do not change what a run computes: a resumed run may change them."""


def launched_world_size() -> int:
    """Processes of the launch (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_config(params: TrainParams) -> dict:
    """The selected model's params block as a plain dict (what the checkpoint stores); a
    ``resolution`` left null takes ``train.crop`` (the input size the model is trained at)."""
    cfg = params_to_dict(getattr(params, params.architecture))
    if "resolution" in cfg and cfg["resolution"] is None:
        cfg["resolution"] = params.crop
    return cfg


# --------------------------------------------------------------------------------------------
# optimiser and schedule
# --------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.AdamW:
    """AdamW over the trained parameters at ``lr`` x ``lr_multiplier``; weight decay on all of
    them (``weight_decay_rule: all``) or on >= 2-d ones only (``matrices``)."""
    lr = params.lr * params.lr_multiplier
    trained = [p for p in model.parameters() if p.requires_grad]
    if params.weight_decay_rule == "all":
        groups = [{"params": trained, "weight_decay": params.weight_decay}]
    else:
        groups = [
            {"params": [p for p in trained if p.dim() >= 2], "weight_decay": params.weight_decay},
            {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def lr_factor(params: TrainParams) -> Callable[[int], float]:
    """Step -> factor of each parameter's peak lr.

    Warm-up (``w = params.warmup_steps()`` steps): ``r + (1 - r) x step / w`` with ``r =
    warmup_ratio`` (mmcv's linear warm-up). Then, with ``m = min_lr_ratio``:
    ``cosine``: ``m + (1 - m) x (1 + cos(pi t)) / 2``, t = (step - w) / (steps - w);
    ``poly``: ``m + (1 - m) x (1 - step / steps) ^ poly_power`` over all steps, the warm-up
    factor multiplying it (mmcv's PolyLrUpdaterHook with ``min_lr`` = m x peak).
    """
    steps, warm = params.steps, params.warmup_steps()
    r, m = params.warmup_ratio, params.min_lr_ratio

    def warmup(step: int) -> float:
        return r + (1 - r) * step / warm if step < warm else 1.0

    def cosine(step: int) -> float:
        if step < warm:
            return warmup(step)
        t = (step - warm) / max(1, steps - warm)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))

    def poly(step: int) -> float:
        return (m + (1 - m) * (1 - min(step, steps) / steps) ** params.poly_power) * warmup(step)

    return cosine if params.schedule == "cosine" else poly


class _LossModule(nn.Module):
    """Wraps a segmenter so that one DDP forward computes its whole loss (positive,
    counterfactual and their passes), whatever calls the model makes inside."""

    def __init__(self, model: nn.Module, params: TrainParams, autocast) -> None:
        super().__init__()
        self.model = model
        self.params = params
        self.autocast = autocast

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            total, parts = self.model.compute_loss(batch, self.params)
        return total.float(), torch.tensor([parts[k] for k in PARTS], device=total.device)


# --------------------------------------------------------------------------------------------
# resumable state
# --------------------------------------------------------------------------------------------
def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def run_key(
    params: TrainParams,
    seed: int,
    index: D.PairIndex,
    filter_dir: Path,
    vocab_dir: Path,
    world: int,
) -> str:
    """16 hex digits of a sha256 over everything that determines a run: the train params (but
    :data:`NOT_IN_KEY`), the seed, the filter and vocabulary manifests, every sample file's
    size and modification time, the source of the loaded magicseg modules, the torch version,
    the thread count and the number of processes."""
    h = hashlib.sha256()
    p = {k: v for k, v in params_to_dict(params).items() if k not in NOT_IN_KEY}
    h.update(json.dumps({"train": p, "seed": seed, "world": world}, sort_keys=True).encode())
    h.update(f"torch {torch.__version__} threads {torch.get_num_threads()}".encode())
    for manifest in (Path(filter_dir) / "manifest.parquet", Path(vocab_dir) / "manifest.parquet"):
        _file_digest(manifest, h)
    for path in (*index.images, *index.cf_images, *index.masks):
        st = os.stat(path)
        h.update(f"{path}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    for name in sorted(m for m in sys.modules if m == "magicseg" or m.startswith("magicseg.")):
        source = getattr(sys.modules[name], "__file__", None)
        if source and source.endswith(".py") and os.path.isfile(source):
            h.update(name.encode())
            _file_digest(Path(source), h)
    return h.hexdigest()[:16]


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters and all buffers (CPU): frozen weights are rebuilt from their source."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}


def save_state(
    path: Path, model, opt, sched, step: int, window, records, val, ema: Ema | None = None
) -> None:
    """Atomically write what a run resumes from (see the module docstring)."""
    blob = {
        "ema": None if ema is None else ema.state_dict(),
        "step": step,
        "model": _trained_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "window": window,
        "records": records,
        "val": val,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_state(
    path: Path, model, opt, sched, ema: Ema | None = None
) -> tuple[int, list, list, dict]:
    """Restore what :func:`save_state` wrote; returns (step, loss window, records, val)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a damaged state is a user-visible data problem
        raise DataError(
            f"{path}: unreadable training state ({type(err).__name__}); delete it"
        ) from None
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise DataError(f"{path}: state does not match the model ({unexpected or missing})")
    if (ema is None) != (blob.get("ema") is None):
        raise DataError(
            f"{path}: state {'without' if ema else 'with'} an EMA (train.ema); delete it"
        )
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    if ema is not None:
        ema.load_state_dict(blob["ema"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return int(blob["step"]), list(blob["window"]), list(blob["records"]), dict(blob["val"])


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    model,
    val_loader,
    text_features: torch.Tensor,
    device: torch.device,
    autocast,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ConfusionMatrix:
    """Confusion matrix (vocabulary space, background = 0) of this process's validation shard,
    summed over the processes by ``reduce``. Each image is scored against every vocabulary
    class, or against its ``sampled`` classes (``train.val_num_sampled``)."""
    was_training = model.training
    model.eval()
    k = text_features.shape[0]
    cm = ConfusionMatrix(k + 1, ignore_index=IGNORE)
    feats = text_features.to(device)
    for raw in val_loader:
        images = raw["image"].to(device)
        sampled = raw["sampled"].to(device)
        with autocast():
            if sampled.shape[1]:
                pred = model(images, feats[sampled - 1]).logits.argmax(1)
                ids = torch.cat([torch.zeros_like(sampled[:, :1]), sampled], dim=1)
                pred = torch.gather(ids, 1, pred.flatten(1)).view_as(pred)
            else:
                pred = model(images, feats).logits.argmax(1)
        cm.update(pred.cpu(), raw["mask"])
    model.train(was_training)
    if reduce is not None:
        counts = torch.from_numpy(np.concatenate([cm.matrix.ravel(), cm.missed])).to(device)
        counts = reduce(counts).cpu().numpy()
        out = ConfusionMatrix(k + 1, ignore_index=IGNORE)
        out._matrix[:] = counts[: (k + 1) ** 2].reshape(k + 1, k + 1)
        out._missed[:] = counts[(k + 1) ** 2 :]
        cm = out
    return cm


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def train(
    filter_dir: str | Path,
    vocab_dir: str | Path,
    params: TrainParams,
    seed: int,
    out_dir: str | Path,
    live_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
    text_encoder: TextEncoder | None = None,
    stop_at: int | None = None,
    history: list[float] | None = None,
) -> dict:
    """Train ``params.architecture`` on the samples of ``filter_dir``; write
    ``<out_dir>/model.pt`` and return the metrics dict.

    ``vocab_dir``: the vocabulary manifest. ``live_dir``: dvclive directory (``train.logger:
    dvclive``; None logs nothing). ``state_dir``: where resumable states live (``<state_dir>/
    <run key>/``; None keeps none). ``text_encoder`` overrides the model's (tests).
    ``stop_at``: stop after that many steps, with a state and no model.pt (an interrupted
    run; tests). ``history``: receives every step's loss (all processes' mean; tests).

    Metrics: steps, samples_train, samples_val, val_samples (scored), loss, pixel_loss, cf_loss
    (means of the last ``log_every`` steps), val_miou, val_pixel_acc (None without a validation
    split), num_sampled_effective, num_params, num_trained_params, processes.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # 1. Inputs, checked before any work; the accelerator (process group, device).
    t0 = time.perf_counter()
    vocab = load_vocabulary(vocab_dir)
    device = resolve_device(params.device, "train.device")
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    set_deterministic(params.deterministic)
    world = launched_world_size()
    acc = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    dtype = autocast_dtype(params.precision, device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    cfg = model_config(params)
    encoder = text_encoder or build_text_encoder(_text_encoder_name(params.architecture, cfg), cfg)
    train_index, val_index = D.load_split(filter_dir, vocab, params.val_fraction, seed)
    samples_val = len(val_index)
    val_index = D.val_subset(val_index, params.val_samples, seed)
    batch_size = min(params.batch_size, len(train_index))
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size: {batch_size} images per step do not split over {world} processes"
        )
    rows = D.cf_rows(batch_size, params.cf_fraction).reshape(world, -1)
    if params.cf_weight > 0 and not rows.any(axis=1).all():
        raise ConfigError(
            f"train.cf_fraction: {params.cf_fraction} leaves a process without counterfactuals "
            f"in a batch of {batch_size} over {world} processes; raise it"
        )
    trainable = vocab.trainable
    k = min(params.num_sampled, len(trainable))
    if params.num_sampled > len(trainable) and main:
        print(
            f"warning: train.num_sampled: {params.num_sampled} exceeds the {len(trainable)} "
            f"trainable classes; using {len(trainable)}",
            file=sys.stderr,
        )

    # 2. Frozen text features of the whole vocabulary, once.
    text_features = encoder.encode(list(vocab.names)).float()

    # 3. Model, optimiser, schedule: seeded, identical on every rank; resume if a state exists.
    torch.manual_seed(derive_seed(seed, "train.init"))
    model = build_model(params.architecture, cfg, encoder.dim).to(device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema = Ema(model, params.ema) if params.ema is not None else None
    opt = make_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(params))
    run_dir = None
    if state_dir is not None:
        key = run_key(params, seed, train_index, Path(filter_dir), Path(vocab_dir), world)
        run_dir = Path(state_dir) / key
    start, window, records = 0, [], []
    val = {"val_miou": float("nan"), "val_pixel_acc": float("nan")}
    if run_dir is not None and (run_dir / STATE).is_file():
        start, window, records, val = load_state(run_dir / STATE, model, opt, sched, ema)
        if main:
            print(f"train: resuming at step {start} from {run_dir / STATE}", file=sys.stderr)
    if params.compile:
        model.compile()
    wrapped = acc.prepare(_LossModule(model, params, autocast))
    logger = make_logger(params.logger if main else "none", live_dir, params_to_dict(params))
    for step, logs in records:  # a resumed run's curves start where the killed one's did
        logger.log(logs, step)

    # 4. Data: this rank's slice of every global batch, streamed; its validation shard.
    items = D.TrainItems(
        train_index, D.BatchPlan(len(train_index), batch_size, seed), trainable, k, params, seed
    )
    end = params.steps if stop_at is None else min(stop_at, params.steps)
    pin = device.type == "cuda"
    batches = D.StepBatches(start, end, batch_size, rank, world)
    train_loader = D.loader(items, batches, params.num_workers, pin)
    val_items = D.ValItems(val_index, trainable, params.val_num_sampled, seed)
    val_ids = D.shard(len(val_items), rank, world)
    val_loader = D.loader(
        torch.utils.data.Subset(val_items, val_ids),
        D.val_batches(len(val_ids), params.val_batch_size),
        0,
        pin,
    )

    # 5. The loop.
    t_loop, t_val = time.perf_counter(), 0.0
    bar = tqdm(
        range(start, end), desc=f"train ({params.architecture})", unit="step", disable=not main
    )
    for step, raw in zip(bar, train_loader, strict=True):
        batch = D.to_batch(raw, text_features).to(device, non_blocking=pin)
        if params.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            batch.cf_images = batch.cf_images.contiguous(memory_format=torch.channels_last)
        loss, detached = wrapped(batch)
        if not torch.isfinite(loss):
            raise DataError(f"train: loss became {loss.item()} at step {step} (lower train.lr)")
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        parts = dict(zip(PARTS, acc.reduce(detached.float(), "mean").tolist(), strict=True))
        if history is not None:
            history.append(parts["loss"])
        window = [*window[-(params.log_every - 1) :], parts]
        done = step + 1
        last = done == params.steps
        if done % params.log_every == 0 or last:
            logs = {f"train/{k}": float(np.mean([w[k] for w in window])) for k in PARTS}
            logs["train/lr"] = sched.get_last_lr()[0]
            if len(val_index) and (done % params.val_every == 0 or last):
                tv = time.perf_counter()
                with maybe_applied(ema, model):
                    cm = validate(model, val_loader, text_features, device, autocast, _sum(acc))
                t_val += time.perf_counter() - tv
                val = {
                    "val_miou": cm.miou(np.flatnonzero(cm.present()[1:]) + 1),
                    "val_pixel_acc": cm.pixel_accuracy(),
                }
                logs["val/miou"] = val["val_miou"]
            logger.log(logs, done)
            records.append((done, logs))
            bar.set_postfix(loss=f"{logs['train/loss']:.3f}", val=f"{val['val_miou']:.3f}")
        if run_dir is not None and main and (done % params.checkpoint_every == 0 or done == end):
            save_state(run_dir / STATE, model, opt, sched, done, window, records, val, ema)
    logger.close()
    t_train = time.perf_counter() - t_loop

    # 6. Checkpoint and metrics (no wall-clock); timings beside the state.
    model = model.to(memory_format=torch.contiguous_format)
    metrics = {
        "steps": end,
        "samples_train": len(train_index),
        "samples_val": samples_val,
        "val_samples": len(val_index),
        **{k: round(float(np.mean([w[k] for w in window])), 5) for k in PARTS if window},
        **{k: (round(v, 5) if np.isfinite(v) else None) for k, v in val.items()},
        "num_sampled_effective": k,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "num_trained_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "processes": world,
    }
    if end == params.steps and main:
        image_size = (params.crop,) * 2 if params.crop else train_index.read(0)[0].shape[:2]
        with maybe_applied(ema, model):  # the averaged weights are the model
            save_checkpoint(
                Path(out_dir) / CHECKPOINT,
                model,
                params.architecture,
                cfg,
                encoder.name,
                list(vocab.names),
                sorted(vocab.holdout),
                image_size,
                meta={"train": params_to_dict(params), "seed": seed, "metrics": metrics},
            )
    timing = {
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(t_train, 2),
        "steps_run": end - start,
        "seconds_per_step": round(t_train / max(1, end - start), 4),
        "validation_seconds": round(t_val, 2),
        "validation_share": round(t_val / t_train, 4) if t_train else None,
        "threads": torch.get_num_threads(),
        "processes": world,
    }
    if main:
        if run_dir is not None and end > start:  # a finished run rebuilt from its state: keep
            write_json(run_dir / TIMING, timing)
        print(
            f"train: {timing['seconds']} s ({timing['steps_run']} steps at "
            f"{timing['seconds_per_step']} s, validation {timing['validation_seconds']} s)",
            file=sys.stderr,
        )
    acc.wait_for_everyone()
    if params.deterministic:
        set_deterministic(False)
    return metrics


def _sum(acc) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: acc.reduce(t, "sum")
