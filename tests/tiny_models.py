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


# --------------------------------------------------------------------------------------------
# transformer families (SD3, FLUX.1, FLUX.2 [klein]), tokenizers built here (no hub)
# --------------------------------------------------------------------------------------------
_WORDS = (
    "a an the of on in with and photo picture red blue green ball dog cat beach street table "
    "car bird tree number park grass sky house room person"
).split()


def t5_tokenizer(model_max_length: int = 512):
    """A T5 (Unigram, SentencePiece-style ``▁`` pieces) tokenizer built from a word list: pad
    0, eos 1, unk 2, every lowercase letter and digit alone and after ``▁``, a few words."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer built from the byte alphabet and a few merges,
    with the ChatML special tokens and a chat template (what FLUX.2 [klein] applies)."""
    from transformers import Qwen2Tokenizer

    alphabet = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("o", "n"), ("i", "n")]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(alphabet + ["".join(m) for m in merges]))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def _clip_config(vocab_size: int, hidden: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _flow_vae(latent_channels: int):
    """A 2-block VAE (factor 2) for the flow-matching families."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_flux_pipeline_dir(tmp_path: Path, guidance_embeds: bool = False) -> Path:
    """Save a tiny random FLUX.1 pipeline (CLIP + T5 encoders, a 1+1-layer transformer on 4
    latent channels, VAE factor 2; ``guidance_embeds`` False: a [schnell]-type model) and
    return its directory."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    tmp_path = Path(tmp_path)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "src"))
    tok2 = t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(4),
        text_encoder=CLIPTextModel(_clip_config(len(tok))).eval(),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    out = tmp_path / ("tiny-flux-dev" if guidance_embeds else "tiny-flux")
    pipe.save_pretrained(out)
    return out


def tiny_sd3_pipeline_dir(tmp_path: Path) -> Path:
    """Save a tiny random SD3 pipeline without its T5 encoder (``text_encoder_3`` None: the
    pipeline pads the CLIP embeddings) and return its directory. VAE factor 2, patch 1."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tmp_path = Path(tmp_path)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "src"))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(_clip_config(len(tok))).eval(),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tok))).eval(),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
        transformer=transformer,
    )
    out = tmp_path / "tiny-sd3"
    pipe.save_pretrained(out)
    return out


def tiny_flux2_klein_pipeline_dir(tmp_path: Path, is_distilled: bool = True) -> Path:
    """Save a tiny random FLUX.2 [klein] pipeline (a 28-layer, 16-wide Qwen3 text encoder:
    the pipeline stacks its layers 9, 18 and 27; a 1+1-layer transformer on 4 x 4 latent
    channels; VAE factor 2) and return its directory. ``is_distilled``: a step-distilled
    checkpoint, which ignores guidance."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tmp_path = Path(tmp_path)
    tok = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    ).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    out = tmp_path / "tiny-klein"
    pipe.save_pretrained(out)
    return out
