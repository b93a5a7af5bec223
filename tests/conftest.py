"""Shared fixtures: a tiny random text encoder and a tiny filter-like data directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One thread: a busy 2-core machine makes multi-threaded ops wait on each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-d random BERT with the (offline) MiniLM tokenizer, saved to disk."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from magicseg.model.text import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_text_dir):
    from magicseg.model.text import HFMeanPoolEncoder

    return HFMeanPoolEncoder(tiny_text_dir, name="tiny")


def make_data(
    root: Path, n: int = 12, size: int = 32, holdout: int = 8, novel_words: int = 1, seed: int = 0
):
    """Vocabulary + a filter-like directory of ``n`` procedural pairs (oracle masks).

    Layout mirrors the pipeline: ``vocabulary/``, ``generate/{images,counterfactual}``,
    ``label/masks`` and ``filter/manifest.parquet`` with paths relative to ``filter/``.
    Returns (vocab_dir, filter_dir, vocab).
    """
    from magicseg.core.config import ProceduralGeneratorParams
    from magicseg.core.io import write_image, write_manifest, write_mask
    from magicseg.core.vocabulary import build_vocabulary
    from magicseg.generate.base import PromptRecord
    from magicseg.generate.procedural import ProceduralGenerator

    vocab = build_vocabulary(
        "procedural", holdout_combination=holdout, holdout_novel_words=novel_words, seed=seed
    )
    write_manifest(root / "vocabulary", vocab.to_frame())
    gen = ProceduralGenerator(ProceduralGeneratorParams(), size, size)
    rows = []
    trainable = vocab.trainable
    for i in range(n):
        ids = (trainable[i % len(trainable)],)
        if i % 3 == 2:
            ids = (*ids, trainable[(i * 7 + 3) % len(trainable)])
        names = tuple(vocab.display[c - 1] for c in ids)
        rec = PromptRecord(
            f"s{i:03d}", f"a photo of {' and '.join(names)} in a forest", "", ids, names, 1000 + i
        )
        pair = gen.render(rec)
        write_image(root / f"generate/images/{rec.id}.png", pair.positive)
        write_image(root / f"generate/counterfactual/{rec.id}.png", pair.counterfactual)
        write_mask(root / f"label/masks/{rec.id}.png", pair.oracle_mask, len(vocab))
        rows.append(
            {
                "id": rec.id,
                "prompt": rec.prompt,
                "class_ids": list(ids),
                "class_names": list(names),
                "image": f"../generate/images/{rec.id}.png",
                "cf_image": f"../generate/counterfactual/{rec.id}.png",
                "mask": f"../label/masks/{rec.id}.png",
            }
        )
    write_manifest(root / "filter", pd.DataFrame(rows))
    return root / "vocabulary", root / "filter", vocab


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def tiny_train_params(**overrides):
    from magicseg.core.config import TrainParams

    base = {
        "steps": 3,
        "batch_size": 4,
        "num_sampled": 5,
        "log_every": 1,
        "val_every": 2,
        "val_fraction": 0.2,
        "num_threads": 1,
        "precision": "fp32",
        "cf_fraction": 1.0,
        "cf_weight": 0.5,  # the counterfactual term on, so that the tests exercise it
        "architecture": "offline",  # the loop's tests on the U-Net (minizeg: test_miniclip)
        "offline": {"width": 8, "depth": 2, "embed_dim": 16},
    }
    return TrainParams.model_validate(base | overrides)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP checkpoint (vision + text towers, tokenizer) built from configs."""
    from tests.tiny_clip import tiny_clip_dir

    return tiny_clip_dir(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def clip_text(clip_dir):
    """The CLIP text encoder of :func:`clip_dir`, one template."""
    from magicseg.model import build_text_encoder

    return build_text_encoder("clip", {"checkpoint": str(clip_dir), "templates": "single"})
