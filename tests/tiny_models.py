"""Tiny random-initialised models built from configs, for offline tests (no hub, no weights).

``tiny_sd_pipeline_dir(tmp_path)`` writes a complete Stable Diffusion 1.x-style pipeline
directory (``model_index.json``, UNet, VAE, CLIP text model, CLIP tokenizer, scheduler) that
loads through ``DiffusionPipeline.from_pretrained(<dir>)`` like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

# 26 letters + a few merges are enough for prompts to tokenize into distinct ids.
_MERGES = ["t h", "th e</w>", "a n", "o n", "i n", "e r", "o r", "r e"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(path: Path) -> Path:
    """Write a small CLIP BPE tokenizer (vocab.json + merges.txt) and return its directory.

    The vocabulary is the 256-symbol byte alphabet, each symbol with ``</w>``, a few merges and
    the two special tokens: 512 + merges + 2 ids.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m.split()) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    src = path / "clip_vocab"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    # transformers 5: pass the vocabulary itself (``vocab_file=`` silently gives a 1-token vocab)
    tok = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split()) for m in _MERGES], model_max_length=77
    )
    out = path / "tokenizer"
    tok.save_pretrained(out)
    return out


def tiny_sd_components(
    vocab_size: int, sample_size: int = 8, cross_attention_dim: int = 32, seed: int = 0
) -> dict:
    """Random tiny SD components (UNet ~0.4M, VAE ~0.5M, 2-layer CLIP text model, DDIM)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def tiny_sd_pipeline_dir(tmp_path: Path) -> Path:
    """Save a tiny random SD pipeline with ``save_pretrained`` and return its directory.

    The VAE has one downsampling step (scale factor 2), so a 16x16 image has 8x8 latents.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tmp_path = Path(tmp_path)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "src"))
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(len(tok)),
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp_path / "tiny-sd"
    pipe.save_pretrained(out)
    return out


def tiny_sdxl_pipeline_dir(tmp_path: Path) -> Path:
    """Save a tiny random SDXL pipeline (two text encoders, ``text_time`` conditioning) and
    return its directory. VAE factor 2, as in :func:`tiny_sd_pipeline_dir`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tmp_path = Path(tmp_path)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "src"))
    base = tiny_sd_components(len(tok))
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # both text encoders' hidden states concatenated
        norm_num_groups=32,
    )
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=len(tok) - 2,
        eos_token_id=len(tok) - 1,
        pad_token_id=len(tok) - 1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=base["vae"],
        text_encoder=CLIPTextModel(cfg).eval(),
        text_encoder_2=CLIPTextModelWithProjection(cfg).eval(),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    out = tmp_path / "tiny-sdxl"
    pipe.save_pretrained(out)
    return out
