"""Open-vocabulary segmenters and text encoders, by name, and their checkpoints.

- ``MODELS``: ``build(name, config: dict, text_dim: int) -> nn.Module`` (a :class:`Segmenter`);
  ``config`` is the model's params block as a dict (``train.minizeg``, ``train.offline``,
  ``train.clip``). ``minizeg`` loads its frozen backbone from ``config["backbone"]`` when built
  (the ``pretrain`` stage's checkpoint, committed to git).
- ``TEXT_ENCODERS``: ``build(name, config: dict) -> TextEncoder``.
- A checkpoint (``torch.save`` of a dict, see :func:`save_checkpoint`) carries the model's name
  and config, the text encoder's name, the vocabulary and the weights, so ``evaluate`` and
  ``predict`` rebuild the model without the training params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magicseg.core.errors import BackendError, DataError
from magicseg.core.io import atomic_path
from magicseg.core.registry import Registry
from magicseg.model.base import Segmenter, SegmenterOutput, TextEncoder

MODELS: Registry[Any] = Registry("model")
TEXT_ENCODERS: Registry[TextEncoder] = Registry("text encoder")
CHECKPOINT_FORMAT = 1


@MODELS.register("minizeg")
def _minizeg(config: dict, text_dim: int):
    from magicseg.core.config import MiniZegModelParams
    from magicseg.model.minizeg import MiniZegSegmenter

    cfg = MiniZegModelParams.model_validate(config)
    return MiniZegSegmenter(
        cfg.backbone,
        cfg.text_encoder,
        cfg.vpt_tokens,
        cfg.residual_hidden,
        cfg.decoder_layers,
        cfg.decoder_heads,
        cfg.decoder_dim,
        text_dim,
    )


@MODELS.register("offline")
def _offline(config: dict, text_dim: int):
    from magicseg.core.config import OfflineModelParams
    from magicseg.model.offline import OfflineSegmenter

    cfg = OfflineModelParams.model_validate(config)
    return OfflineSegmenter(cfg.width, cfg.depth, cfg.embed_dim, text_dim)


@MODELS.register("clip")
def _clip(config: dict, text_dim: int):
    from magicseg.core.config import ClipModelParams
    from magicseg.model.clip import ClipSegmenter

    cfg = ClipModelParams.model_validate(config)
    return ClipSegmenter(
        cfg.checkpoint,
        cfg.vpt_tokens,
        cfg.decoder_layers,
        cfg.decoder_heads,
        cfg.decoder_dim,
        text_dim,
        cfg.focal_weight,
        cfg.dice_weight,
        decoder=cfg.decoder,
        vpt_style=cfg.vpt_style,
        image_norm=cfg.image_norm,
        resolution=cfg.resolution,
        deep_supervision=cfg.deep_supervision,
        loss_stride=cfg.loss_stride,
    )


@TEXT_ENCODERS.register("clip")
def _clip_text(config: dict | None = None) -> TextEncoder:
    from magicseg.core.config import ClipModelParams
    from magicseg.core.templates import TEMPLATES
    from magicseg.model.clip import ClipTextEncoder

    cfg = ClipModelParams.model_validate(config or {})
    return ClipTextEncoder(cfg.checkpoint, TEMPLATES[cfg.templates])


@TEXT_ENCODERS.register("minilm")
def _minilm(config: dict | None = None) -> TextEncoder:
    from magicseg.model.text import HFMeanPoolEncoder, minilm_path

    return HFMeanPoolEncoder(minilm_path(), name="minilm")


def text_encoder_name(model: str, config: dict) -> str:
    """The text encoder a model uses: ``config['text_encoder']`` when it names one, else the
    model's own name (e.g. ``clip`` brings its own text tower)."""
    return str(config.get("text_encoder") or model)


def build_model(name: str, config: dict, text_dim: int):
    return MODELS.build(name, config, text_dim)


def build_text_encoder(name: str, config: dict | None = None) -> TextEncoder:
    return TEXT_ENCODERS.build(name, config or {})


def available_offline() -> dict[str, bool]:
    """Which models can be built here without a network (for ``magicseg info``)."""
    out = {}
    for name in MODELS.names():
        if name in ("offline", "minizeg"):
            try:
                from magicseg.model.text import minilm_path

                out[name] = (Path(minilm_path()) / "config.json").is_file()
            except BackendError:
                out[name] = False
        else:
            out[name] = False
    return out


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, CPU), its text encoder and the facts needed
    to use it. ``vocab``: class names, index ``i`` (1-based) = ``vocab[i - 1]``; ``holdout``:
    1-based ids never seen in training; ``image_size``: (H, W) trained on."""

    model: Any
    text_encoder: TextEncoder
    model_name: str
    model_config: dict
    vocab: list[str]
    holdout: list[int]
    image_size: tuple[int, int]
    meta: dict = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model,
    model_name: str,
    model_config: dict,
    text_encoder: str,
    vocab: list[str],
    holdout: list[int],
    image_size: tuple[int, int],
    meta: dict | None = None,
) -> None:
    """``torch.save`` a dict: format, model, config, text_encoder, text_dim, vocab, holdout,
    image_size, state_dict (CPU tensors), meta (training params, metrics, ...). Atomic; the
    same model, config and meta give the same bytes."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "config": dict(model_config),
        "text_encoder": text_encoder,
        "text_dim": int(model.text_dim),
        "vocab": list(vocab),
        "holdout": sorted(int(i) for i in holdout),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "state_dict": state,
        "meta": meta or {},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)  # a file object: the archive's root is "archive", not tmp's name


def load_checkpoint(path: str | Path, text_encoder: TextEncoder | None = None) -> Checkpoint:
    """Rebuild a saved model (eval mode, CPU) and its text encoder.

    ``text_encoder`` overrides the one named in the checkpoint (tests pass a tiny one); it must
    have the same ``dim``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: not a magicseg checkpoint ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a magicseg checkpoint (format {CHECKPOINT_FORMAT})")
    model = build_model(blob["model"], blob["config"], blob["text_dim"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    encoder = text_encoder or build_text_encoder(blob["text_encoder"], blob["config"])
    if encoder.dim != blob["text_dim"]:
        raise DataError(
            f"{path}: text encoder {encoder.name!r} gives {encoder.dim}-d features, the model "
            f"expects {blob['text_dim']}"
        )
    return Checkpoint(
        model=model,
        text_encoder=encoder,
        model_name=blob["model"],
        model_config=blob["config"],
        vocab=list(blob["vocab"]),
        holdout=list(blob["holdout"]),
        image_size=tuple(blob["image_size"]),
        meta=blob.get("meta", {}),
    )


__all__ = [
    "MODELS",
    "TEXT_ENCODERS",
    "Checkpoint",
    "Segmenter",
    "SegmenterOutput",
    "TextEncoder",
    "available_offline",
    "build_model",
    "build_text_encoder",
    "load_checkpoint",
    "save_checkpoint",
    "text_encoder_name",
]
