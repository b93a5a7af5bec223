"""Helpers for the clip model tests: params of a tiny run, and a script entry point that runs
:func:`magicseg.trainer.fit` under a launcher and writes its loss history as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/clip_helpers.py \
        FILTER VOCAB OUT PARAMS_JSON HISTORY_JSON
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
        "crop": 32,
        "warmup": 2,
        "templates": "single",
    }
    clip |= overrides.pop("clip", {})
    base = {
        "architecture": "clip",
        "steps": 4,
        "batch_size": 4,
        "num_sampled": 5,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "cf_weight": 1.0,
        "cf_loss": "hinge_head",
        "log_every": 1,
        "val_every": 2,
        "val_fraction": 0.2,
        "device": "cpu",
        "logger": "none",
        "num_threads": 1,
        "clip": clip,
    }
    return TrainParams.model_validate(base | overrides)


def main(argv: list[str]) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from magicseg.core.config import TrainParams
    from magicseg.trainer import fit

    torch.set_num_threads(1)
    filter_dir, vocab_dir, out, params_json, history_json = argv
    params = TrainParams.model_validate(json.loads(params_json))
    history: list[float] = []
    metrics = fit(filter_dir, vocab_dir, params, 0, out, history=history)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(history_json, "w") as f:
            json.dump({"history": history, "metrics": metrics}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
