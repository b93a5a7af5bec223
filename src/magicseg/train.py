"""The ``train`` stage: fit an open-vocabulary segmenter on the filtered synthetic pairs.

One loop for every model in :data:`magicseg.model.MODELS` (``offline`` now, ``clip`` later):

1. Category random sampling (``train.num_sampled``): each image is scored against ``k`` classes,
   its own first, then random other trainable classes, no duplicates (:func:`sample_classes`).
   The target is remapped into that index space (:func:`remap_target`): 0 = background,
   ``j + 1`` = the ``j``-th sampled class. A vocabulary class in the mask that is not sampled
   for its image (only possible when an image has more than ``k`` own classes, or a labeler
   marked a class outside the prompt's) becomes *ignore*, not background: calling a real
   object background would teach the model to suppress it, and without its embedding in the
   logits we cannot supervise it as itself.
2. Pixel loss: cross-entropy over (background + sampled classes), background weight
   ``train.bg_weight``, ignore pixels skipped.
3. Counterfactual loss (``train.cf_weight`` x one of ``train.cf_loss``), the counterfactual
   passed through the same encoder in the same step:
   - ``hinge_head``: mean max(0, cos(g_pos, g_cf)), g = a small projection head on the pooled
     encoder features (the paper's hinge, kept away from the pixel embeddings);
   - ``hinge_pixels``: the same on the mean of the pixel embeddings (the literal form; it
     fights the pixel objective, see README);
   - ``cf_background``: the counterfactual's pixels supervised as background, scored against
     the positive's sampled classes ("the class is not here");
   - ``text_margin``: max(0, m - cos(g_pos, t) + cos(g_cf, t)) for each own class embedding t
     (``train.cf_margin`` = m).

Outputs: ``<out_dir>/model.pt`` (see :func:`magicseg.model.save_checkpoint`), training curves
through dvclive (``train/loss``, ``train/pixel_loss``, ``train/cf_loss``, ``train/lr``,
``val/miou``) or wandb, and a metrics dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magicseg.core.config import TrainParams, params_to_dict
from magicseg.core.devices import resolve_device
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.io import ignore_index, read_image, read_manifest, read_mask
from magicseg.core.seeding import derive_seed, rng
from magicseg.core.stage import load_vocabulary
from magicseg.core.vocabulary import Vocabulary
from magicseg.metrics import ConfusionMatrix
from magicseg.model import (
    TextEncoder,
    build_model,
    build_text_encoder,
    save_checkpoint,
    text_encoder_name,
)
from magicseg.model.base import to_tensor
from magicseg.model.losses import IGNORE, hinge_cos, pixel_loss, text_margin

CHECKPOINT = "model.pt"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class PairData:
    """Kept samples in memory. ``images``/``cf_images``: NxHxWx3 uint8; ``masks``: NxHxW int32
    vocabulary indices with the ignore value mapped to ``IGNORE``; ``class_ids``: each sample's
    own 1-based classes, prompt order."""

    ids: list[str]
    images: np.ndarray
    cf_images: np.ndarray
    masks: np.ndarray
    class_ids: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray) -> PairData:
        return PairData(
            [self.ids[i] for i in idx],
            self.images[idx],
            self.cf_images[idx],
            self.masks[idx],
            [self.class_ids[i] for i in idx],
        )


def load_pairs(data_dir: str | Path, vocab: Vocabulary) -> PairData:
    """Read a filter (or label) manifest and its images and masks into memory.

    Rows without a mask are skipped; a held-out class in the data, a class id outside the
    vocabulary or images of different sizes are a :class:`DataError`.
    """
    data_dir = Path(data_dir)
    frame = read_manifest(data_dir)
    missing = {"id", "class_ids", "image", "cf_image", "mask"} - set(frame.columns)
    if missing:
        raise DataError(f"{data_dir}/manifest.parquet: missing columns {sorted(missing)}")
    frame = frame[frame["mask"].notna()]
    if frame.empty:
        raise DataError(f"{data_dir}/manifest.parquet: no samples with a mask to train on")
    k = len(vocab)
    ignore = ignore_index(k)
    ids, images, cfs, masks, classes = [], [], [], [], []
    for row in tqdm(frame.itertuples(index=False), total=len(frame), desc="load pairs"):
        own = tuple(int(i) for i in row.class_ids)
        bad = [i for i in own if not 1 <= i <= k]
        if bad:
            raise DataError(f"sample {row.id}: class id {bad[0]} outside the vocabulary 1..{k}")
        leak = [i for i in own if i in vocab.holdout]
        if leak:
            raise DataError(
                f"sample {row.id}: held-out class {vocab.names[leak[0] - 1]!r} in training data"
            )
        image = read_image(data_dir / row.image)
        mask = read_mask(data_dir / row.mask).astype(np.int32)
        if images and image.shape != images[0].shape:
            raise DataError(
                f"sample {row.id}: image {image.shape[:2]} differs from {images[0].shape[:2]}; "
                "all training images must have one size"
            )
        if mask.shape != image.shape[:2]:
            raise DataError(f"sample {row.id}: mask {mask.shape} vs image {image.shape[:2]}")
        mask[mask == ignore] = IGNORE
        ids.append(str(row.id))
        images.append(image)
        cfs.append(read_image(data_dir / row.cf_image))
        masks.append(mask)
        classes.append(own)
    return PairData(ids, np.stack(images), np.stack(cfs), np.stack(masks), classes)


def load_split(
    data_dir: str | Path, vocab: Vocabulary, val_fraction: float, seed: int
) -> tuple[PairData, PairData]:
    """The filtered pairs of ``data_dir`` as (train, validation), split by :func:`split_ids`;
    everything trains when the split would leave no training sample."""
    data = load_pairs(data_dir, vocab)
    is_val = split_ids(data.ids, val_fraction, seed)
    if is_val.all():
        is_val[:] = False
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


def split_ids(ids: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: each id's seed on stream ``train.val_split``
    (independent of the order and of the other samples), so a sample stays on its side when
    the data grows."""
    bucket = np.array([derive_seed(seed, "train.val_split", i) % 1_000_000 for i in ids])
    return bucket < int(round(val_fraction * 1_000_000))


# --------------------------------------------------------------------------------------------
# category sampling
# --------------------------------------------------------------------------------------------
def sample_classes(
    own: Sequence[int], trainable: Sequence[int], k: int, rng: np.random.Generator
) -> list[int]:
    """``min(k, len(trainable))`` distinct 1-based class ids: the image's own classes first
    (prompt order; truncated to ``k``), then random other trainable classes."""
    k = min(k, len(trainable))
    first = list(dict.fromkeys(int(c) for c in own))[:k]
    taken = set(first)
    others = np.array([c for c in trainable if c not in taken], dtype=np.int64)
    extra = rng.choice(others, size=k - len(first), replace=False) if k > len(first) else []
    return first + [int(c) for c in extra]


def remap_target(mask: torch.Tensor, sampled: Sequence[int], num_classes: int) -> torch.Tensor:
    """HxW vocabulary-index mask (``IGNORE`` for ignore) -> HxW target in the sampled index
    space: 0 = background, ``j + 1`` = ``sampled[j]``; every other class -> ``IGNORE``."""
    lut = torch.full((num_classes + 1,), IGNORE, dtype=torch.int64)
    lut[0] = 0
    lut[torch.as_tensor(list(sampled), dtype=torch.int64)] = torch.arange(1, len(sampled) + 1)
    out = torch.full(mask.shape, IGNORE, dtype=torch.int64)
    valid = (mask >= 0) & (mask <= num_classes)
    out[valid] = lut[mask[valid].long()]
    return out


@dataclass
class Batch:
    """One training batch. ``images``/``cf_images``: Bx3xHxW float in [0, 1]; ``features``:
    BxKxT text features of the sampled classes; ``target``: BxHxW in the sampled index space;
    ``own``: BxK bool, True where the sampled class is one of the image's own."""

    images: torch.Tensor
    cf_images: torch.Tensor
    features: torch.Tensor
    target: torch.Tensor
    own: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in vars(self).values()))


def compute_loss(model, batch: Batch, params: TrainParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss = pixel loss + cf_weight x counterfactual loss; also the parts as floats.
    A model with its own ``compute_loss(batch, params)`` (``clip``: focal + dice) uses it."""
    if hasattr(model, "compute_loss"):
        return model.compute_loss(batch, params)
    kind = params.cf_loss
    use_cf = params.cf_weight > 0
    b = batch.images.shape[0]
    cf_loss = batch.images.new_zeros(())
    if use_cf and kind in ("hinge_pixels", "cf_background"):
        # positive and counterfactual through the whole model in one batch
        images = torch.cat([batch.images, batch.cf_images])
        out = model(images, torch.cat([batch.features, batch.features]))
        logits = out.logits[:b]
        if kind == "hinge_pixels":
            cf_loss = hinge_cos(out.pixel_mean[:b], out.pixel_mean[b:])
        else:
            cf_loss = pixel_loss(out.logits[b:], torch.zeros_like(batch.target), 1.0)
    else:
        out = model(batch.images, batch.features)
        logits = out.logits
        if use_cf:
            g_cf = model.embed_images(batch.cf_images)
            if kind == "hinge_head":
                cf_loss = hinge_cos(out.global_embedding, g_cf)
            elif kind == "text_margin":
                cf_loss = text_margin(
                    out.global_embedding, g_cf, out.class_embeddings, batch.own, params.cf_margin
                )
            else:
                raise ConfigError(f"train.cf_loss: unknown {kind!r}")
    pix = pixel_loss(logits, batch.target, params.bg_weight)
    total = pix + params.cf_weight * cf_loss
    return total, {"loss": total.item(), "pixel_loss": pix.item(), "cf_loss": cf_loss.item()}


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
class BatchSampler:
    """Deterministic batches: epoch permutations, random horizontal flips and category sampling
    all drawn from one generator, stream ``train.sampler`` of ``seed``."""

    def __init__(
        self,
        data: PairData,
        text_features: torch.Tensor,
        trainable: Sequence[int],
        params: TrainParams,
        seed: int,
    ) -> None:
        self.data = data
        self.features = text_features
        self.trainable = list(trainable)
        self.k = min(params.num_sampled, len(self.trainable))
        self.batch_size = min(params.batch_size, len(data))
        self.num_classes = text_features.shape[0]
        self.rng = rng(seed, "train.sampler")
        self._order = np.empty(0, dtype=np.int64)

    def _indices(self) -> np.ndarray:
        while len(self._order) < self.batch_size:
            self._order = np.concatenate([self._order, self.rng.permutation(len(self.data))])
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return idx

    def next(self) -> Batch:
        idx = self._indices()
        flip = self.rng.random(len(idx)) < 0.5
        images, cfs, masks = (
            self.data.images[idx],
            self.data.cf_images[idx],
            self.data.masks[idx],
        )
        images[flip] = images[flip, :, ::-1]
        cfs[flip] = cfs[flip, :, ::-1]
        masks[flip] = masks[flip, :, ::-1]
        sampled = [
            sample_classes(self.data.class_ids[i], self.trainable, self.k, self.rng) for i in idx
        ]
        mask_t = torch.from_numpy(masks)
        target = torch.stack(
            [remap_target(m, s, self.num_classes) for m, s in zip(mask_t, sampled, strict=True)]
        )
        sampled_t = torch.tensor(sampled, dtype=torch.int64)
        own = torch.tensor(
            [[c in self.data.class_ids[i] for c in s] for i, s in zip(idx, sampled, strict=True)]
        )
        return Batch(
            images=to_tensor(images),
            cf_images=to_tensor(cfs),
            features=self.features[sampled_t - 1],
            target=target,
            own=own,
        )


# --------------------------------------------------------------------------------------------
# loggers
# --------------------------------------------------------------------------------------------
class _NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _DvcLiveLogger:
    """dvclive that never touches ``dvc.yaml`` nor makes DVC experiments: curves in
    ``<dir>/plots/metrics/<name>.tsv``, the last values in ``<dir>/metrics.json``."""

    def __init__(self, directory: str | Path, params: dict) -> None:
        from dvclive import Live

        self.live = Live(str(directory), dvcyaml=None, save_dvc_exp=False)
        self.live.log_params(params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


class _WandbLogger:
    def __init__(self, directory: str | Path | None, params: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.logger: 'wandb' needs the wandb package (pip install 'magicseg[wandb]')"
            ) from None
        self.run = wandb.init(project="magicseg", config=params, dir=str(directory or "."))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, directory: str | Path | None, params: dict):
    if kind == "none" or (kind == "dvclive" and directory is None):
        return _NullLogger()
    if kind == "dvclive":
        return _DvcLiveLogger(directory, params)
    if kind == "wandb":
        return _WandbLogger(directory, params)
    raise ConfigError(f"train.logger: unknown {kind!r} (allowed: dvclive, wandb, none)")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    model,
    data: PairData,
    text_features: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
) -> ConfusionMatrix:
    """Confusion matrix of ``data`` scored against every vocabulary class (as at test time)."""
    was_training = model.training
    model.eval()
    k = text_features.shape[0]
    cm = ConfusionMatrix(k + 1, ignore_index=IGNORE)
    feats = text_features.to(device)
    for start in range(0, len(data), batch_size):
        images = to_tensor(data.images[start : start + batch_size]).to(device)
        pred = model(images, feats).logits.argmax(1)
        cm.update(pred, data.masks[start : start + batch_size])
    model.train(was_training)
    return cm


def _lr_at(step: int, params: TrainParams) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 5% of ``lr``."""
    warm = max(1, params.steps // 20)
    if step < warm:
        return params.lr * (step + 1) / warm
    t = (step - warm) / max(1, params.steps - warm)
    return params.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def model_config(params: TrainParams) -> dict:
    """The selected model's params block as a plain dict (what the checkpoint stores)."""
    return params_to_dict(getattr(params, params.architecture))


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
    text_encoder: TextEncoder | None = None,
) -> dict:
    """Train ``params.architecture`` on the samples of ``filter_dir``; write ``<out_dir>/model.pt``.

    ``vocab_dir`` holds the vocabulary manifest (names, held-out flags). ``live_dir``: dvclive
    directory (``train.logger: dvclive``; None logs nothing). ``text_encoder`` overrides the
    model's (tests). Deterministic given ``seed`` on a CPU. Returns the metrics dict: steps,
    samples_train, samples_val, loss (mean of the last ``log_every`` steps), pixel_loss,
    cf_loss, val_miou, val_pixel_acc (None without a validation split), num_params,
    seconds.
    """
    # 0. The clip model and launches over several processes: the accelerate loop.
    from magicseg.trainer import fit, launched_world_size

    if params.architecture == "clip" or launched_world_size() > 1:
        return fit(filter_dir, vocab_dir, params, seed, out_dir, live_dir, text_encoder)

    # 1. Inputs, checked before any work.
    t0 = time.perf_counter()
    vocab = load_vocabulary(vocab_dir)
    device = resolve_device(params.device, "train.device")
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    cfg = model_config(params)
    encoder = text_encoder or build_text_encoder(text_encoder_name(params.architecture, cfg), cfg)
    train_data, val_data = load_split(filter_dir, vocab, params.val_fraction, seed)

    # 2. Frozen text features of the whole vocabulary, once.
    text_features = encoder.encode(list(vocab.names)).float()

    # 3. Model and optimiser, seeded.
    torch.manual_seed(derive_seed(seed, "train.init"))
    model = build_model(params.architecture, cfg, encoder.dim).to(device)
    channels_last = device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sampler = BatchSampler(train_data, text_features, vocab.trainable, params, seed)
    logger = make_logger(params.logger, live_dir, params_to_dict(params) | {"seed": seed})

    # 4. The loop.
    window: list[dict[str, float]] = []
    val = {"val_miou": float("nan"), "val_pixel_acc": float("nan")}
    bar = tqdm(range(params.steps), desc=f"train ({params.architecture})", unit="step")
    for step in bar:
        lr = _lr_at(step, params)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sampler.next().to(device)
        if channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            batch.cf_images = batch.cf_images.contiguous(memory_format=torch.channels_last)
        loss, parts = compute_loss(model, batch, params)
        if not torch.isfinite(loss):
            raise DataError(f"train: loss became {loss.item()} at step {step} (lower train.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window = [*window[-(params.log_every - 1) :], parts]
        last = step == params.steps - 1
        if (step + 1) % params.log_every == 0 or last:
            logs = {f"train/{k}": float(np.mean([w[k] for w in window])) for k in parts}
            logs["train/lr"] = lr
            if len(val_data) and ((step + 1) % params.val_every == 0 or last):
                cm = validate(model, val_data, text_features, device)
                val = {
                    "val_miou": cm.miou(np.flatnonzero(cm.present()[1:]) + 1),
                    "val_pixel_acc": cm.pixel_accuracy(),
                }
                logs["val/miou"] = val["val_miou"]
            logger.log(logs, step + 1)
            bar.set_postfix(loss=f"{logs['train/loss']:.3f}", val=f"{val['val_miou']:.3f}")
    logger.close()

    # 5. Checkpoint and metrics.
    model = model.to(memory_format=torch.contiguous_format)
    metrics = {
        "steps": params.steps,
        "samples_train": len(train_data),
        "samples_val": len(val_data),
        **{k: round(float(np.mean([w[k] for w in window])), 5) for k in window[-1]},
        **{k: (round(v, 5) if np.isfinite(v) else None) for k, v in val.items()},
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_checkpoint(
        Path(out_dir) / CHECKPOINT,
        model,
        params.architecture,
        cfg,
        encoder.name,
        list(vocab.names),
        sorted(vocab.holdout),
        train_data.images.shape[1:3],
        meta={"train": params_to_dict(params), "seed": seed, "metrics": metrics},
    )
    return metrics
