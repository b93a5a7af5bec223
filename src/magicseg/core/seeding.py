"""Named random streams: every random source in magicseg takes its seed from the global seed
and a dotted stream name, ``derive_seed(seed, "prompts.plan")``, never from a bare number.

A stream's seed depends on what it is for (and, through ``parts``, on which item it serves:
a request number, a sample id), not on the order, batch or process it is drawn in. Two streams
never share a seed by accident, and renaming a stream is a visible change of the data.

The names live in :data:`STREAMS` (a test checks that every call site uses one of them).
"""

from __future__ import annotations

import hashlib

import numpy as np

STREAMS: dict[str, str] = {
    "vocabulary.holdout": "which classes are held out of training",
    "pretrain.corpus": "per corpus image (of pretrain.seed): its scene, object and caption",
    "pretrain.test": "per zero-shot test image (of pretrain.seed): its scene, object, caption",
    "pretrain.init": "the image tower's initialisation (torch's global generator)",
    "pretrain.batches": "per step: which corpus images form the batch",
    "prompts.plan": "the order that breaks ties between equally used classes in the plan",
    "prompts.second_class": "per request: whether it gets a second class, and the tie-break "
    "among the least used ones",
    "prompts.request": "per request: the writer's seed (template choices, LLM sampling)",
    "generate.sample": "per prompt: the pair's seed (the positive and its counterfactual share "
    "it); written by prompts into the manifest, drawn from by generate",
    "generate.cf_noise": "per pair, from its seed: the counterfactual's own initial noise "
    "(generate.diffusers.pair_noise: independent)",
    "label.grounded_proxy": "per sample id, from label.grounded_proxy.seed: the offline "
    "Grounded-SAM stand-in's errors (bleeding, missed parts, clutter, confusions)",
    "filter.gallery": "which kept and dropped samples the filter gallery shows",
    "train.init": "model initialisation (torch's global generator)",
    "train.val_split": "per sample id: training or validation side",
    "train.sampler": "per epoch: the order of the training samples (the batch plan)",
    "train.sample": "per (step, batch position): the flip and the sampled classes of one item",
    "train.augment": "per (step, batch position): resize, crop and colour augmentation",
    "train.val_subset": "which validation samples are scored during training",
    "train.val_classes": "per validation sample: the classes it is scored against",
    "evaluate.test_classes": "the order in which test images cycle over the classes",
    "evaluate.test_second_class": "per test image: whether it gets a second class, and which",
    "evaluate.test_prompts": "per test image: the template writer's seed",
    "evaluate.test_sample": "per test image: the rendered pair's seed",
}
"""Every stream name and what it draws."""


def derive_seed(seed: int, name: str, *parts: object) -> int:
    """A 63-bit seed for stream ``name`` of the global ``seed``, optionally per item
    (``derive_seed(0, "generate.sample", "r000001-003")``): the first 8 bytes of the sha256 of
    the printed arguments. ``name`` must be one of :data:`STREAMS`."""
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}: add it to magicseg.core.seeding.STREAMS")
    text = "\x1f".join(str(p) for p in (seed, name, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng(seed: int, name: str, *parts: object) -> np.random.Generator:
    """A numpy generator on stream ``name`` (see :func:`derive_seed`)."""
    return np.random.default_rng(derive_seed(seed, name, *parts))
