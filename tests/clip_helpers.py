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


def train_two_processes(filter_dir, vocab_dir, out, params, text_dir=None, timeout=300) -> dict:
    """Run this file under ``torch.distributed.run`` with 2 gloo processes (one thread each, a
    free rendezvous port): the train loop on ``params`` writing to ``out/two``; returns its
    ``{"history", "metrics"}`` (``out/h.json``). ``text_dir``: a text-encoder directory for
    the offline model (none: the CLIP text tower of ``params``)."""
    import os
    import socket
    import subprocess
    from pathlib import Path

    from magicseg.core.config import params_to_dict

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root / 'src'}:{root}", OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", port, str(root / "tests/clip_helpers.py"), str(filter_dir),
        str(vocab_dir), str(Path(out) / "two"), json.dumps(params_to_dict(params)),
        str(Path(out) / "h.json"), *([str(text_dir)] if text_dir else []),
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((Path(out) / "h.json").read_text())


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
