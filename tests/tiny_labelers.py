"""Random-initialised modern labelers built from configs (offline), for tests and benchmarks,
saved with ``save_pretrained`` so the labelers load them through their real path.

- MM-Grounding-DINO (``MMGroundingDinoForObjectDetection``; LLMDet checkpoints load through the
  same class): the tiny Grounding DINO of :mod:`tests.tiny_grounded_sam` in the MM layout, with
  bert-base-uncased's tokenizer.
- SAM 2.1 (``Sam2Model``): a one-stage-per-level Hiera at 128 px.
- SAM 3 (``Sam3Model``): a 2-layer ViT at 112 px, a 1-layer CLIP text tower and the small CLIP
  BPE tokenizer of :mod:`tests.tiny_models` (built locally, no hub).

The SAM 2 and SAM 3 image processors need torchvision, so their ``preprocessor_config.json``
is written as JSON (the fields the project's own preprocessing reads).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_grounded_sam import bert_tokenizer, build_sam, detector_config_kwargs


def build_mm_grounding_dino(size: str = "tiny"):
    """(model, processor) for ``size`` tiny / small, random weights, eval mode."""
    import torch
    from transformers import (
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    tok = bert_tokenizer()
    torch.manual_seed(0)
    px, kwargs = detector_config_kwargs(size, len(tok))
    config = MMGroundingDinoConfig(**kwargs, max_text_len=32)
    image_proc = GroundingDinoImageProcessorPil(
        size={"shortest_edge": px, "longest_edge": px * 5 // 4}
    )
    model = MMGroundingDinoForObjectDetection(config).eval()
    return model, GroundingDinoProcessor(image_processor=image_proc, tokenizer=tok)


def sam2_preprocessor_config(px: int) -> dict:
    """What ``Sam2ImageProcessor`` saves, for a square ``px`` input."""
    return {
        "image_processor_type": "Sam2ImageProcessorFast",
        "processor_class": "Sam2Processor",
        "size": {"height": px, "width": px},
        "mask_size": {"height": px // 4, "width": px // 4},
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }


def build_sam2(size: str = "tiny"):
    """(model, preprocessor config dict) of a random SAM 2.1 at 128 px (tiny) or 256 px (small)."""
    import torch
    from transformers import Sam2Config, Sam2Model

    px = {"tiny": 128, "small": 256}[size]
    torch.manual_seed(0)
    feat = [[px // 4, px // 4], [px // 8, px // 8], [px // 16, px // 16]]
    config = Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 12,
                "num_attention_heads": 1,
                "image_size": [px, px],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [12, 24, 48, 96],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [4, 4, 4, 4],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [96, 48, 24, 12],
            "backbone_feature_sizes": feat,
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": px, "patch_size": 16},
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    return Sam2Model(config).eval(), sam2_preprocessor_config(px)


def sam3_preprocessor_config(px: int) -> dict:
    """What ``Sam3ImageProcessor`` saves, for a square ``px`` input."""
    return {
        "image_processor_type": "Sam3ImageProcessorFast",
        "processor_class": "Sam3Processor",
        "size": {"height": px, "width": px},
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def build_sam3(tokenizer, size: str = "tiny"):
    """(model, preprocessor config dict) of a random SAM 3 at 112 px (tiny) or 224 px (small),
    its text tower sized to ``tokenizer``."""
    import torch
    from transformers import Sam3Config, Sam3Model

    px, layers = {"tiny": (112, 2), "small": (224, 4)}[size]
    side = px // 14
    hidden = 32
    torch.manual_seed(0)
    config = Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "image_size": px,
                "patch_size": 14,
                "window_size": side // 2,
                "global_attn_indexes": [layers - 1],
                "pretrain_image_size": px,
            },
            "fpn_hidden_size": hidden,
            "backbone_feature_sizes": [[side * 4] * 2, [side * 2] * 2, [side] * 2],
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "projection_dim": hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        geometry_encoder_config={
            "hidden_size": hidden,
            "num_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
        },
        detr_encoder_config={
            "hidden_size": hidden,
            "num_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
        },
        detr_decoder_config={
            "hidden_size": hidden,
            "num_layers": 1,
            "num_queries": 8,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
        },
        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2},
    )
    return Sam3Model(config).eval(), sam3_preprocessor_config(px)


def clip_tokenizer(root: Path):
    """The small CLIP BPE tokenizer of :func:`tests.tiny_models.write_clip_tokenizer`, with
    SAM 3's text length (32)."""
    from tests.tiny_models import write_clip_tokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root))
    tok.model_max_length = 32
    return tok


def _save(model, proc, out: Path) -> Path:
    model.save_pretrained(out)
    if isinstance(proc, dict):
        (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=1))
    else:
        proc.save_pretrained(out)
    return out


def save_mm_grounding_dino(root: str | Path, size: str = "tiny") -> Path:
    return _save(*build_mm_grounding_dino(size), Path(root) / f"mm-gdino-{size}")


def save_sam2(root: str | Path, size: str = "tiny") -> Path:
    return _save(*build_sam2(size), Path(root) / f"sam2-{size}")


def save_sam(root: str | Path, size: str = "tiny") -> Path:
    return _save(*build_sam(size), Path(root) / f"sam-{size}")


def save_sam3(root: str | Path, size: str = "tiny") -> Path:
    """SAM 3 weights, preprocessor config and tokenizer under ``root/sam3-<size>``."""
    root = Path(root)
    tok = clip_tokenizer(root / "sam3-tokenizer-src")
    out = _save(*build_sam3(tok, size), root / f"sam3-{size}")
    tok.save_pretrained(out)
    return out
