"""Helpers for the model tests: params of a tiny clip run, a batch of the training data, and
a script entry point that runs :func:`magicseg.training.loop.train` under a launcher and
writes its loss history as JSON:

    python -m torch.distributed.run --nproc_per_node 2 tests/clip_helpers.py \
        FILTER VOCAB OUT PARAMS_JSON HISTORY_JSON [TEXT_ENCODER_DIR]

``TEXT_ENCODER_DIR``: a saved BERT-like model used as the text encoder (the offline model's
tests); without it the model's own text encoder is built.
"""

from __future__ import annotations

import json
import sys


def tiny_clip_params(clip_dir, **overrides):
    from magicseg.core.config import TrainParams

    clip = {
        "checkpoint": str(clip_dir),
        "vpt_tokens": 2,
        "decoder_layers": 2,
        "decoder_heads": 2,
        "decoder_dim": 16,
        "templates": "single",
    }
    clip |= overrides.pop("clip", {})
    base = {
        "architecture": "clip",
        "steps": 4,
        "batch_size": 4,
        "num_sampled": 5,
        "lr": 1e-3,
        "lr_multiplier": 10.0,
        "weight_decay": 0.01,
        "weight_decay_rule": "matrices",
        "schedule": "poly",
        "min_lr_ratio": 0.0,
        "warmup": 2,
        "warmup_ratio": 0.5,
        "crop": 32,
        "photometric": True,
        "cf_weight": 1.0,
        "cf_loss": "hinge_head",
        "cf_fraction": 1.0,
        "precision": "fp32",
        "log_every": 1,
        "val_every": 2,
        "val_fraction": 0.2,
        "val_batch_size": 2,
        "channels_last": False,
        "device": "cpu",
        "logger": "none",
        "num_threads": 1,
        "clip": clip,
    }
    return TrainParams.model_validate(base | overrides)


def first_batch(tiny_data, encoder, params, seed: int = 0, step: int = 0, augment=False):
    """The global training batch of ``step`` of a run on ``tiny_data`` (a model Batch); with
    ``augment`` resized, cropped and coloured as the run's params say, else flips only."""
    from magicseg.training.data import BatchPlan, TrainItems, batch_at, read_index

    if not augment:
        params = params.model_copy(update={"crop": None, "photometric": False})
    _, filter_dir, vocab = tiny_data
    index = read_index(filter_dir, vocab)
    plan = BatchPlan(len(index), min(params.batch_size, len(index)), seed)
    items = TrainItems(index, plan, vocab.trainable, params.num_sampled, params, seed)
    return batch_at(items, step, encoder.encode(list(vocab.names)))


def main(argv: list[str]) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from magicseg.core.config import TrainParams
    from magicseg.training.loop import train

    torch.set_num_threads(1)
    filter_dir, vocab_dir, out, params_json, history_json, *text = argv
    encoder = None
    if text:
        from magicseg.model.text import HFMeanPoolEncoder

        encoder = HFMeanPoolEncoder(text[0], name="tiny")
    params = TrainParams.model_validate(json.loads(params_json))
    history: list[float] = []
    metrics = train(filter_dir, vocab_dir, params, 0, out, text_encoder=encoder, history=history)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(history_json, "w") as f:
            json.dump({"history": history, "metrics": metrics}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
