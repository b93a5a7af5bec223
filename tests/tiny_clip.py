"""A tiny random-initialised CLIP (vision + text + tokenizer) saved like a hub checkpoint."""

from __future__ import annotations

from pathlib import Path

from tests.tiny_models import write_clip_tokenizer


def tiny_clip_dir(path: Path, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Write ``CLIPModel`` (hidden 32, 2 layers, projection 16) + a small CLIP BPE tokenizer
    to ``path/clip`` and return it; loads with ``from_pretrained(<dir>)`` like a hub id."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(path))
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tok),
            "intermediate_size": 64,
            "max_position_embeddings": 77,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            **small,
            "intermediate_size": 64,
            "image_size": image_size,
            "patch_size": patch,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    out = path / "clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
