"""Loading a pipeline: the model source, the family and licence checks, scheduler, device and
speed settings. Nothing heavy is imported at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from magicseg.core.config import DiffusersGeneratorParams
from magicseg.core.errors import BackendError, ConfigError
from magicseg.generate.diffusers.families import (
    Family,
    check_params,
    is_noncommercial,
    pipeline_facts,
    read_facts,
)

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
"""``generate.diffusers.scheduler`` -> (diffusers class, overrides); ``default`` keeps the
checkpoint's own scheduler (the right choice for SD-Turbo)."""


# --------------------------------------------------------------------------------------------
# resolving the model source (cheap; no weights loaded)
# --------------------------------------------------------------------------------------------
def resolve_model_source(model: str, key: str = "generate.diffusers.checkpoint") -> str:
    """A local pipeline directory or a hub id that can be loaded here, else a one-line error
    naming ``key``.

    :func:`magicseg.hub.check_model_source` first (a path must exist; a hub id must be cached,
    or the hub must answer unless ``HF_HUB_OFFLINE`` is set); a local directory must then hold
    ``model_index.json`` (a ``save_pretrained`` pipeline).
    """
    from magicseg.hub import check_model_source

    if check_model_source(model, key) != "local":
        return model
    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            f"{key}: {model!r} is not a diffusers pipeline directory (no model_index.json); "
            "save one with pipe.save_pretrained(dir) or `huggingface-cli download <id> "
            "--local-dir dir`"
        )
    return str(path)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def set_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by the named one, built from the checkpoint's config."""
    if name == "default":
        return
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def load_pipeline(
    opts: DiffusersGeneratorParams,
    device,
    dtype,
    *,
    model: str | None = None,
    inpaint: bool = False,
):
    """Load a text-to-image (or inpainting) pipeline: dtype, device, scheduler, speed settings.

    The checkpoint's family and licence are checked against ``opts`` from the files on disk
    before any weight loads (:func:`.families.check_params`), and again on the loaded
    pipeline (an uncached hub id). Wraps hub/filesystem failures in :class:`BackendError` with
    the model named.
    """
    import diffusers
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    key = "generate.diffusers.inpaint_checkpoint" if inpaint else "generate.diffusers.checkpoint"
    source = resolve_model_source(model or opts.checkpoint, key)
    facts = read_facts(source)
    if inpaint:
        if facts is not None and is_noncommercial(facts.licence) and not opts.accept_noncommercial:
            raise ConfigError(
                f"generate.diffusers.accept_noncommercial: {source!r} is under a "
                f"non-commercial licence ({facts.licence}); set it to true to accept its terms"
            )
    elif facts is not None:
        check_params(opts, facts)
    auto = AutoPipelineForInpainting if inpaint else AutoPipelineForText2Image
    # diffusers >= 0.42 renamed torch_dtype -> dtype (the old name warns)
    new_api = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42)
    kwargs: dict[str, Any] = {"dtype" if new_api else "torch_dtype": dtype}
    if not opts.safety_checker and (facts is None or facts.family in ("sd", None)):
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    if facts is not None:  # saved without a model (SD3 without T5): load as None
        kwargs |= {name: None for name in facts.absent if name not in kwargs}
    try:
        pipe = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(
            f"{key}: cannot load {source!r} ({first}); give a hub id (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers pipeline directory"
        ) from None
    if inpaint:
        _settings(pipe, opts, device, "unet")
    else:
        prepare_pipeline(pipe, opts, device, source)
    return pipe


def prepare_pipeline(pipe, opts: DiffusersGeneratorParams, device, source: str = "") -> Family:
    """Check the pipeline's family against ``opts`` (see :func:`.families.check_params`;
    ``source``: the checkpoint it came from, for its licence), then set scheduler, device,
    memory format, attention and compile settings. Returns the family."""
    fam = check_params(opts, pipeline_facts(pipe, source))
    _settings(pipe, opts, device, fam.denoiser)
    return fam


def _settings(pipe, opts: DiffusersGeneratorParams, device, denoiser_name: str) -> None:
    import torch

    set_scheduler(pipe, opts.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, denoiser_name)
    if device.type == "cuda":
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        # decode one image at a time: a batched 512 px VAE decode costs GBs per image
        if hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()
    if opts.attention_slicing:
        pipe.enable_attention_slicing()
    if opts.compile:
        setattr(pipe, denoiser_name, torch.compile(denoiser))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HWC float in [0, 1] -> HWC uint8 (round half up, clipped)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
