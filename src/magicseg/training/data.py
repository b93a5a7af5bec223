"""Training data streamed from disk: the filter manifest is read once (ids, paths, classes);
images, counterfactuals and masks are read item by item (DataLoader workers), so memory does
not grow with the dataset.

Every random draw of a run is a function of the seed and of where it is used, never of the
order the items are read in, of the worker that reads them or of an earlier draw:

- :class:`BatchPlan`: global position ``i = step x batch_size + j`` of the run reads sample
  ``permutation_e[i mod n]``, ``e = i // n`` (stream ``train.sampler``, per epoch ``e``);
- :class:`TrainItems`: the item at (step, j) is flipped and gets its sampled classes from
  stream ``train.sample`` of (step, j), its resize/crop/colours from ``train.augment``.

So the state a run resumes from is its step (plus the model, optimiser and schedule), and N
processes that each take a slice of the same global batch see the items one process sees.

Formats: images HWC uint8 on disk -> 3xHxW float in [0, 1]; masks HxW vocabulary indices
(0 = background, ``i`` = vocabulary class ``i``, the mask's ignore value -> ``IGNORE``) ->
targets HxW int64 in the sampled index space (:func:`remap_target`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from magicseg.core.errors import DataError
from magicseg.core.io import ignore_index, read_image, read_manifest, read_mask
from magicseg.core.seeding import derive_seed, rng
from magicseg.core.vocabulary import Vocabulary
from magicseg.model.base import Batch
from magicseg.model.losses import IGNORE

COLUMNS = ("id", "class_ids", "image", "cf_image", "mask")
FIELDS = ("ids", "images", "cf_images", "masks", "class_ids")


# --------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairIndex:
    """The samples of a filter (or label) manifest without their pixels: ids, absolute paths
    of the positive, counterfactual and mask PNGs, each sample's own 1-based classes (prompt
    order). ``num_classes``: the vocabulary size (mask values 1..num_classes)."""

    ids: tuple[str, ...]
    images: tuple[str, ...]
    cf_images: tuple[str, ...]
    masks: tuple[str, ...]
    class_ids: tuple[tuple[int, ...], ...]
    num_classes: int

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> PairIndex:
        pick = [int(i) for i in idx]
        return PairIndex(
            *(tuple(getattr(self, f)[i] for i in pick) for f in FIELDS),
            num_classes=self.num_classes,
        )

    def read(
        self, i: int, counterfactual: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``i`` from disk: (HxWx3 uint8 positive, HxWx3 uint8 counterfactual, HxW int64
        mask with the ignore value mapped to ``IGNORE``). ``counterfactual=False``: the
        counterfactual is not read (zeros in its place: rows whose counterfactual no loss sees,
        validation)."""
        image = read_image(self.images[i])
        cf = read_image(self.cf_images[i]) if counterfactual else np.zeros_like(image)
        mask = read_mask(self.masks[i]).astype(np.int64)
        if mask.shape != image.shape[:2] or cf.shape != image.shape:
            raise DataError(
                f"sample {self.ids[i]}: image {image.shape[:2]}, counterfactual {cf.shape[:2]} "
                f"and mask {mask.shape} differ in size"
            )
        mask[mask == ignore_index(self.num_classes)] = IGNORE
        return image, cf, mask


def read_index(data_dir: str | Path, vocab: Vocabulary) -> PairIndex:
    """The samples of ``data_dir/manifest.parquet`` that have a mask (no pixels are read).

    A held-out class in the data, a class id outside the vocabulary, a missing column or no
    sample at all are a :class:`DataError`.
    """
    data_dir = Path(data_dir)
    frame = read_manifest(data_dir)
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"{data_dir}/manifest.parquet: missing columns {sorted(missing)}")
    frame = frame[frame["mask"].notna()]
    if frame.empty:
        raise DataError(f"{data_dir}/manifest.parquet: no samples with a mask to train on")
    k = len(vocab)
    classes = []
    for sid, own in zip(frame["id"], frame["class_ids"], strict=True):
        own = tuple(int(c) for c in own)
        bad = [c for c in own if not 1 <= c <= k]
        if bad:
            raise DataError(f"sample {sid}: class id {bad[0]} outside the vocabulary 1..{k}")
        leak = [c for c in own if c in vocab.holdout]
        if leak:
            raise DataError(
                f"sample {sid}: held-out class {vocab.names[leak[0] - 1]!r} in training data"
            )
        classes.append(own)

    def paths(column: str) -> tuple[str, ...]:
        return tuple(str(data_dir / p) for p in frame[column])

    return PairIndex(
        tuple(str(i) for i in frame["id"]),
        paths("image"),
        paths("cf_image"),
        paths("mask"),
        tuple(classes),
        k,
    )


def split_ids(ids: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: each id's seed on stream ``train.val_split``
    (independent of the order and of the other samples), so a sample stays on its side when
    the data grows."""
    bucket = np.array([derive_seed(seed, "train.val_split", i) % 1_000_000 for i in ids])
    return bucket < int(round(val_fraction * 1_000_000))


def load_split(
    data_dir: str | Path, vocab: Vocabulary, val_fraction: float, seed: int
) -> tuple[PairIndex, PairIndex]:
    """The samples of ``data_dir`` as (train, validation) indexes, split by :func:`split_ids`;
    everything trains when the split would leave no training sample."""
    index = read_index(data_dir, vocab)
    is_val = split_ids(index.ids, val_fraction, seed)
    if is_val.all():
        is_val[:] = False
    return index.subset(np.flatnonzero(~is_val)), index.subset(np.flatnonzero(is_val))


def val_subset(val: PairIndex, n: int, seed: int) -> PairIndex:
    """A fixed subset of at most ``n`` validation samples (stream ``train.val_subset``), in
    manifest order."""
    if len(val) <= n:
        return val
    pick = np.sort(rng(seed, "train.val_subset").choice(len(val), size=n, replace=False))
    return val.subset(pick)


# --------------------------------------------------------------------------------------------
# category sampling
# --------------------------------------------------------------------------------------------
def sample_classes(
    own: Sequence[int], trainable: Sequence[int], k: int, gen: np.random.Generator
) -> list[int]:
    """``min(k, len(trainable))`` distinct 1-based class ids: the image's own classes first
    (prompt order; truncated to ``k``), then random other trainable classes."""
    k = min(k, len(trainable))
    first = list(dict.fromkeys(int(c) for c in own))[:k]
    taken = set(first)
    others = np.array([c for c in trainable if c not in taken], dtype=np.int64)
    extra = gen.choice(others, size=k - len(first), replace=False) if k > len(first) else []
    return first + [int(c) for c in extra]


def remap_target(
    mask: np.ndarray | torch.Tensor, sampled: Sequence[int], num_classes: int
) -> torch.Tensor:
    """HxW vocabulary-index mask (``IGNORE`` for ignore) -> HxW target in the sampled index
    space: 0 = background, ``j + 1`` = ``sampled[j]``; every other class -> ``IGNORE`` (a real
    object that is not scored is not called background)."""
    lut = np.full(num_classes + 2, IGNORE, dtype=np.int64)  # last slot: out of range
    lut[0] = 0
    lut[np.asarray(list(sampled), dtype=np.int64)] = np.arange(1, len(sampled) + 1)
    m = np.asarray(mask, dtype=np.int64)
    m = np.where((m >= 0) & (m <= num_classes), m, num_classes + 1)
    return torch.from_numpy(lut[m])


# --------------------------------------------------------------------------------------------
# the batch plan
# --------------------------------------------------------------------------------------------
class BatchPlan:
    """Which sample each global position ``i = step x batch_size + j`` of a run reads: epoch
    ``e = i // n`` is a permutation of the ``n`` samples (stream ``train.sampler``, per
    epoch), so every sample is read once per epoch whatever the batch size."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed

    @lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations per worker
    def _epoch(self, e: int) -> np.ndarray:
        return rng(self.seed, "train.sampler", e).permutation(self.n)

    def sample(self, i: int) -> int:
        e, r = divmod(i, self.n)
        return int(self._epoch(e)[r])


def cf_rows(batch_size: int, fraction: float) -> np.ndarray:
    """Which positions of a global batch pass their counterfactual (``train.cf_fraction``):
    ``round(fraction x batch)`` of them (at least 1), spread evenly, so every process's slice
    gets its share."""
    if fraction >= 1.0:
        return np.ones(batch_size, dtype=bool)
    j = np.arange(batch_size)
    return np.floor((j + 1) * fraction + 1e-9) > np.floor(j * fraction + 1e-9)


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
def augment_item(
    image: torch.Tensor,
    cf: torch.Tensor,
    target: torch.Tensor,
    crop: int | None,
    scale_range: tuple[float, float],
    photometric: bool,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3xHxW positive and counterfactual in [0, 1] and their HxW target -> (with ``crop``)
    random resize by a factor in ``scale_range`` and a random ``crop`` x ``crop`` window,
    padded with 0 (images) and ``IGNORE`` (target); (with ``photometric``) brightness,
    contrast and saturation, each with probability 0.5. The same draws for both images; all
    from ``gen``."""

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    pair = torch.stack([image, cf])
    if crop is not None:
        # 1. Random resize.
        h, w = pair.shape[-2:]
        s = u(*scale_range)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        pair = F.interpolate(pair, size=size, mode="bilinear", antialias=True)
        target = F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].long()
        # 2. Pad to at least crop, then a random crop.
        ph, pw = max(0, crop - size[0]), max(0, crop - size[1])
        if ph or pw:
            pair = F.pad(pair, (0, pw, 0, ph), value=0.0)
            target = F.pad(target, (0, pw, 0, ph), value=IGNORE)
        y = int(torch.randint(0, pair.shape[-2] - crop + 1, (), generator=gen))
        x = int(torch.randint(0, pair.shape[-1] - crop + 1, (), generator=gen))
        pair, target = pair[..., y : y + crop, x : x + crop], target[y : y + crop, x : x + crop]
    if photometric:
        # 3. Photometric distortion, the same for both images.
        if u(0, 1) < 0.5:
            pair = pair + u(-32 / 255, 32 / 255)
        if u(0, 1) < 0.5:
            mean = pair.mean(dim=(1, 2, 3), keepdim=True)
            pair = (pair - mean) * u(0.5, 1.5) + mean
        if u(0, 1) < 0.5:
            gray = (pair * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            pair = gray + (pair - gray) * u(0.5, 1.5)
        pair = pair.clamp(0, 1)
    return pair[0].contiguous(), pair[1].contiguous(), target.contiguous()


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
READ_CACHE_BYTES = 512 * 2**20
"""Most bytes of decoded training samples :class:`TrainItems` keeps in memory (all or none)."""


class TrainItems(torch.utils.data.Dataset):
    """Item ``i`` = global position ``i = step x batch_size + j`` of the run: its sample
    (:class:`BatchPlan`) read from disk, flipped, its classes sampled, its target remapped,
    augmented. Returns a dict: ``image``/``cf_image`` 3xHxW float, ``target`` HxW int64,
    ``sampled`` K int64 (1-based class ids), ``own`` K bool, ``cf_row`` bool, ``id`` str."""

    def __init__(
        self,
        index: PairIndex,
        plan: BatchPlan,
        trainable: Sequence[int],
        num_sampled: int,
        params,
        seed: int,
    ) -> None:
        self.index = index
        self.plan = plan
        self.trainable = list(trainable)
        self.k = min(num_sampled, len(self.trainable))
        self.crop = params.crop
        self.scale_range = tuple(params.scale_range)
        self.photometric = params.photometric
        self.cf = cf_rows(plan.batch_size, params.cf_fraction)
        self.seed = seed
        # 0. The decoded samples stay in memory when the whole set fits READ_CACHE_BYTES (the
        #    offline profile: about 200 MB): PNG decoding was 15% of a CPU step. Same bytes. One
        #    preallocated array per field, filled as samples are first read: kept in many small
        #    arrays instead, they pinned the heap between the steps' large temporaries and the
        #    resident memory grew by about 5 MB a step.
        #    Only a :class:`PairIndex` (files) is cached; any other index (anything with
        #    ``ids``, ``class_ids``, ``num_classes`` and ``read``) is read as it is.
        self._cache: dict[str, np.ndarray] | None = None
        if isinstance(index, PairIndex) and len(index):
            image = read_image(index.images[0])
            n, (h, w) = len(index), image.shape[:2]
            if n * h * w * (3 + 3 + 8) <= READ_CACHE_BYTES:
                self._cache = {
                    "image": np.empty((n, h, w, 3), np.uint8),
                    "cf": np.empty((n, h, w, 3), np.uint8),
                    "mask": np.empty((n, h, w), np.int64),
                    "have": np.zeros((n, 2), bool),  # [positive and mask, counterfactual]
                }

    def __len__(self) -> int:  # positions are generated by the batch sampler, not enumerated
        return 2**62

    def _read(self, s: int, counterfactual: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``index.read(s, counterfactual)``, from the in-memory arrays when the set fits (the
        caller never writes into what it gets: flips are views, the rest copies). The arrays are
        sized from the first sample: a sample of another size is read from disk each time."""
        c = self._cache
        if c is None:
            return self.index.read(s, counterfactual=counterfactual)
        have = c["have"][s]
        if not have[0] or (counterfactual and not have[1]):
            image, cf, mask = self.index.read(s, counterfactual=counterfactual)
            if image.shape != c["image"].shape[1:] or mask.shape != c["mask"].shape[1:]:
                return image, cf, mask
            c["image"][s], c["mask"][s] = image, mask
            if counterfactual:
                c["cf"][s] = cf
            have[:] = True, have[1] or counterfactual
        cf = c["cf"][s] if counterfactual else np.zeros_like(c["image"][s])
        return c["image"][s], cf, c["mask"][s]

    def __getitem__(self, i: int) -> dict:
        step, j = divmod(int(i), self.plan.batch_size)
        s = self.plan.sample(int(i))
        own = self.index.class_ids[s]
        # 1. Read (the counterfactual only where this row's is passed: cf_rows); 2. flip and
        #    sample classes (stream train.sample of (step, j)).
        image, cf, mask = self._read(s, bool(self.cf[j]))
        gen = rng(self.seed, "train.sample", step, j)
        if gen.random() < 0.5:
            image, cf, mask = image[:, ::-1], cf[:, ::-1], mask[:, ::-1]
        sampled = sample_classes(own, self.trainable, self.k, gen)
        # 3. Target in the sampled index space; 4. resize, crop, colours.
        target = remap_target(mask, sampled, self.index.num_classes)
        img_t, cf_t = _to_chw(image), _to_chw(cf)
        if self.crop is not None or self.photometric:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "train.augment", step, j))
            img_t, cf_t, target = augment_item(
                img_t, cf_t, target, self.crop, self.scale_range, self.photometric, g
            )
        return {
            "id": self.index.ids[s],
            "image": img_t,
            "cf_image": cf_t,
            "target": target,
            "sampled": torch.tensor(sampled, dtype=torch.int64),
            "own": torch.tensor([c in own for c in sampled]),
            "cf_row": bool(self.cf[j]),
        }


class ValItems(torch.utils.data.Dataset):
    """Validation sample ``i`` as it is on disk (no flip, no augmentation): ``image`` 3xHxW
    float, ``mask`` HxW int64 vocabulary indices (``IGNORE``), ``sampled``: the classes it is
    scored against (1-based; own first, then seeded others, stream ``train.val_classes``) or an
    empty tensor for every vocabulary class, ``id``."""

    def __init__(
        self, index: PairIndex, trainable: Sequence[int], num_sampled: int | None, seed: int
    ) -> None:
        self.index = index
        self.trainable = list(trainable)
        self.k = num_sampled
        self.seed = seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        image, _, mask = self.index.read(i, counterfactual=False)
        sampled: list[int] = []
        if self.k is not None:
            gen = rng(self.seed, "train.val_classes", self.index.ids[i])
            sampled = sample_classes(self.index.class_ids[i], self.trainable, self.k, gen)
        return {
            "id": self.index.ids[i],
            "image": _to_chw(image),
            "mask": torch.from_numpy(np.array(mask)),
            "sampled": torch.tensor(sampled, dtype=torch.int64),
        }


def collate(items: list[dict]) -> dict:
    """Stack a list of item dicts; images of different sizes are a :class:`DataError`."""
    first = items[0]
    for it in items[1:]:
        if it["image"].shape != first["image"].shape:
            raise DataError(
                f"sample {it['id']}: image {tuple(it['image'].shape[1:])} differs from "
                f"{tuple(first['image'].shape[1:])} of sample {first['id']}; training batches "
                "need one size: set train.crop, or make the images one size"
            )
    out: dict = {"id": [it["id"] for it in items]}
    for key, value in first.items():
        if key == "id":
            continue
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([it[key] for it in items])
        else:
            out[key] = torch.tensor([it[key] for it in items])
    return out


def to_batch(raw: dict, text_features: torch.Tensor) -> Batch:
    """A collated :class:`TrainItems` dict -> :class:`Batch` (features of the sampled classes:
    BxKxT from the KvxT vocabulary ``text_features``)."""
    return Batch(
        images=raw["image"],
        cf_images=raw["cf_image"],
        features=text_features[raw["sampled"] - 1],
        target=raw["target"],
        own=raw["own"],
        cf_rows=raw["cf_row"],
    )


def batch_at(items: TrainItems, step: int, text_features: torch.Tensor) -> Batch:
    """The whole global batch of ``step``, read in this process (tests, benchmarks)."""
    b = items.plan.batch_size
    return to_batch(collate([items[step * b + j] for j in range(b)]), text_features)


class StepBatches:
    """Batch sampler: for each step in ``[start, end)``, this process's slice of the global
    positions ``step x batch_size + j`` (contiguous slices, rank order)."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int) -> None:
        self.start, self.end = start, end
        self.batch_size = batch_size
        per = batch_size // world
        self.lo, self.hi = rank * per, (rank + 1) * per

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            base = step * self.batch_size
            yield [base + j for j in range(self.lo, self.hi)]


def shard(n: int, rank: int, world: int) -> list[int]:
    """This process's share of ``n`` validation samples (every ``world``-th)."""
    return list(range(rank, n, world))


def worker_init(_: int) -> None:
    """DataLoader workers read and augment on one thread each (the training process keeps
    the cores)."""
    torch.set_num_threads(1)


def loader(
    dataset: torch.utils.data.Dataset,
    batch_sampler,
    num_workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with :func:`collate` (``num_workers`` processes; each
    prepares 2 batches ahead). Its own generator: starting an iteration draws nothing from
    torch's global RNG, so a resumed run's dropout draws follow the uninterrupted run's."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=worker_init if num_workers else None,
        generator=torch.Generator(),  # leaves torch's global RNG alone
    )


def val_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


__all__ = [
    "BatchPlan",
    "PairIndex",
    "StepBatches",
    "TrainItems",
    "ValItems",
    "batch_at",
    "cf_rows",
    "collate",
    "load_split",
    "read_index",
    "remap_target",
    "sample_classes",
    "split_ids",
    "to_batch",
    "val_subset",
]
