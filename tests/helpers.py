"""Small data made in tests: prompts -> pairs -> labels on the procedural catalogue."""

from __future__ import annotations

from pathlib import Path

from magicseg.core.config import Params
from magicseg.core.io import write_manifest
from magicseg.core.vocabulary import build_vocabulary
from magicseg.generate import run_generate
from magicseg.label import run_label
from magicseg.prompts.stage import run_prompts

# the pretrain stage in miniature, for end-to-end runs (seconds, not minutes)
TINY_PRETRAIN = {
    "images": 32,
    "test_images": 16,
    "size": 32,
    "stem_width": 4,
    "width": 16,
    "layers": 1,
    "heads": 2,
    "steps": 2,
    "batch_size": 8,
    "warmup_steps": 1,
}

# dvc.yaml's stages in pipeline order (tests/test_layers.py checks the file against it)
STAGES = (
    "vocabulary",
    "pretrain",
    "check",
    "prompts",
    "generate",
    "label",
    "filter",
    "train",
    "evaluate",
)


def make_dataset(
    root: Path, requests: int = 6, per_request: int = 2, drift: float = 0.2, seed: int = 0
):
    """Write vocabulary/prompts/generate/label dirs under ``root``; return (vocab, params)."""
    p = Params()
    vocab = build_vocabulary("procedural", holdout_combination=8, seed=seed)
    write_manifest(root / "vocabulary", vocab.to_frame())
    prompts = p.prompts.model_copy(update={"requests": requests, "per_request": per_request})
    run_prompts(vocab, prompts, seed, root / "prompts")
    gen = p.generate.model_copy(
        update={"procedural": p.generate.procedural.model_copy(update={"drift": drift})}
    )
    run_generate(root / "prompts", root / "generate", gen, len(vocab))
    run_label(root / "generate", root / "label", p.label, len(vocab))
    return vocab, p
