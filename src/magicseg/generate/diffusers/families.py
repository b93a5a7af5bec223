"""Model families, what a checkpoint is (without loading weights) and its licence.

A family says how a pipeline is driven: which pipeline classes belong to it, where its
denoiser lives (``unet`` or ``transformer``), the layout of the ``latents=`` its pipeline
takes (:mod:`.unet`, :mod:`.sd3`, :mod:`.flux`, :mod:`.flux2`) and which params it cannot
honour (:func:`check_params`: each refused in one line naming its key, never ignored).

:class:`ModelFacts` is read from a local pipeline directory or the Hugging Face cache
(``model_index.json``, the denoiser's ``config.json``, the model card's licence) or from a
loaded pipeline, so the pre-flight and the generator apply the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import magicseg.generate.diffusers.flux as flux
import magicseg.generate.diffusers.flux2 as flux2
import magicseg.generate.diffusers.sd3 as sd3
import magicseg.generate.diffusers.unet as unet
from magicseg.core.config import DiffusersGeneratorParams
from magicseg.core.errors import ConfigError

KEY = "generate.diffusers"


@dataclass(frozen=True)
class Family:
    """How a family of pipelines is driven.

    ``noise(pipe, seed, height, width, device, dtype)`` returns one image's initial latents in
    the layout the pipeline's ``latents=`` takes (a leading batch dimension of 1), equal to
    what the pipeline draws itself for ``generator=torch.Generator("cpu").manual_seed(seed)``
    at batch 1. ``size_multiple(pipe)``: what ``generate.height``/``width`` must divide by.
    """

    name: str
    label: str
    pipelines: tuple[str, ...]
    denoiser: str
    latent_layout: str
    noise: Callable[..., Any]
    size_multiple: Callable[[Any], int]
    cross_attention: bool
    """The inpainting counterfactual's recorder knows this denoiser's attention."""
    schedulers: bool
    """``generate.diffusers.scheduler`` may replace the checkpoint's scheduler (DDPM-type
    schedulers); flow-matching families keep their own (``scheduler: default``)."""
    safety_checker: bool


FAMILIES: dict[str, Family] = {
    "sd": Family(
        "sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), "unet",
        "(B, 4, H/8, W/8)", unet.noise, unet.size_multiple, True, True, True,
    ),
    "sdxl": Family(
        "sdxl", "SDXL", ("StableDiffusionXLPipeline",), "unet",
        "(B, 4, H/8, W/8)", unet.noise, unet.size_multiple, True, True, False,
    ),
    "sd3": Family(
        "sd3", "Stable Diffusion 3", ("StableDiffusion3Pipeline",), "transformer",
        "(B, 16, H/8, W/8)", sd3.noise, sd3.size_multiple, False, False, False,
    ),
    "flux": Family(
        "flux", "FLUX.1", ("FluxPipeline",), "transformer",
        "packed (B, (H/16)(W/16), 64)", flux.noise, flux.size_multiple, False, False, False,
    ),
    "flux2": Family(
        "flux2", "FLUX.2", ("Flux2Pipeline", "Flux2KleinPipeline"), "transformer",
        "(B, 128, H/16, W/16), packed by the pipeline", flux2.noise, flux2.size_multiple,
        False, False, False,
    ),
}  # fmt: skip
"""``generate.diffusers.family`` -> its :class:`Family`."""

LICENCES: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/sdxl-turbo": "sai-nc-community",
    "stabilityai/sd-turbo": "sai-nc-community",
    "stabilityai/stable-diffusion-3.5-medium": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-large": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-large-turbo": "stabilityai-ai-community",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
    "black-forest-labs/FLUX.1-dev": "flux-1-dev-non-commercial-license",
    "black-forest-labs/FLUX.2-dev": "flux-dev-non-commercial-license",
    "black-forest-labs/FLUX.2-klein-4B": "apache-2.0",
    "black-forest-labs/FLUX.2-klein-9B": "flux-non-commercial-license",
}
"""Licences of the checkpoints this project documents (their model cards' ``license_name``,
else ``license``). Other checkpoints: their model card's front matter when it is on disk."""

NONCOMMERCIAL = ("non-commercial", "noncommercial", "-nc-", "cc-by-nc")
"""A licence name containing one of these forbids commercial use."""


def is_noncommercial(licence: str | None) -> bool:
    name = f"-{(licence or '').lower()}-"
    return any(mark in name for mark in NONCOMMERCIAL)


@dataclass(frozen=True)
class ModelFacts:
    """What a checkpoint is: its pipeline class, family (None: none supported), licence
    (None: unknown), and the denoiser config entries the params depend on."""

    pipeline: str
    family: str | None
    licence: str | None
    config: dict[str, Any] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    """Components ``model_index.json`` lists as saved without a model (``[null, null]``, e.g.
    SD3's ``text_encoder_3``): they load as None."""


def family_of(pipeline_class: str) -> str | None:
    """The family whose pipelines include ``pipeline_class`` (e.g. ``FluxPipeline`` ->
    ``flux``; an inpainting/img2img class is not a text-to-image family: None)."""
    for name, fam in FAMILIES.items():
        if pipeline_class in fam.pipelines:
            return name
    return None


def _inferred_licence(pipeline: str, config: dict[str, Any]) -> str | None:
    """Where no model card says: a FLUX.1 transformer with guidance embedding is FLUX.1
    [dev] or a derivative, a ``Flux2Pipeline`` is FLUX.2 [dev]; both non-commercial."""
    if pipeline == "FluxPipeline" and config.get("guidance_embeds"):
        return LICENCES["black-forest-labs/FLUX.1-dev"]
    if pipeline == "Flux2Pipeline":
        return LICENCES["black-forest-labs/FLUX.2-dev"]
    return None


def _front_matter_licence(text: str) -> str | None:
    """``license_name`` (else ``license``) from a model card's YAML front matter."""
    if not text.startswith("---"):
        return None
    head = text[3:].split("\n---", 1)[0]
    found: dict[str, str] = {}
    for line in head.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("license", "license_name") and value.strip():
            found[key.strip()] = value.strip().strip("'\"")
    return found.get("license_name") or found.get("license")


def _reader(source: str) -> Callable[[str], str | None]:
    """A function reading a file of the checkpoint (local directory, else the HF cache), None
    where the file is not on disk."""
    path = Path(source).expanduser()
    if path.is_dir():
        return lambda name: (path / name).read_text() if (path / name).is_file() else None

    def cached(name: str) -> str | None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, name)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached
            return None
        return Path(found).read_text() if isinstance(found, str) else None

    return cached


def read_facts(source: str) -> ModelFacts | None:
    """The checkpoint's facts from the files on disk (no weights loaded); None when its
    ``model_index.json`` is not on disk (an uncached hub id) or names no pipeline class:
    known once loaded."""
    read = _reader(source)
    index_text = read("model_index.json")
    if index_text is None:
        return None
    index = json.loads(index_text)
    if "_class_name" not in index:  # not written by save_pretrained: known once loaded
        return None
    pipeline = str(index["_class_name"])
    family = family_of(pipeline)
    config: dict[str, Any] = {}
    if family is not None:
        text = read(f"{FAMILIES[family].denoiser}/config.json")
        config = json.loads(text) if text else {}
    config |= {k: v for k, v in index.items() if k == "is_distilled"}
    card = read("README.md")
    licence = LICENCES.get(source) or (_front_matter_licence(card) if card else None)
    licence = licence or _inferred_licence(pipeline, config)
    absent = tuple(k for k, v in index.items() if isinstance(v, list) and v == [None, None])
    return ModelFacts(pipeline, family, licence, config, absent)


def pipeline_facts(pipe, source: str) -> ModelFacts:
    """The same facts from a loaded pipeline (``source``: the checkpoint it came from)."""
    pipeline = type(pipe).__name__
    family = family_of(pipeline)
    config: dict[str, Any] = {}
    if family is not None:
        config = dict(getattr(pipe, FAMILIES[family].denoiser).config)
    if "is_distilled" in pipe.config:
        config["is_distilled"] = pipe.config["is_distilled"]
    disk = read_facts(source) if source else None
    licence = LICENCES.get(source) or (disk.licence if disk else None)
    licence = licence or _inferred_licence(pipeline, config)
    return ModelFacts(pipeline, family, licence, config)


def check_params(opts: DiffusersGeneratorParams, facts: ModelFacts) -> Family:
    """The checkpoint's family, after refusing every param it cannot honour (a
    :class:`ConfigError` naming the key): an unsupported pipeline, a family that differs
    from ``family``, a non-commercial licence without ``accept_noncommercial``
    (:func:`check_licence`), the options the family has no use for
    (:func:`check_family_options`), guidance the checkpoint would ignore."""
    # 1. The family.
    if facts.family is None:
        supported = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
        what = facts.pipeline or "pipeline of no known class"
        raise ConfigError(
            f"{KEY}.checkpoint: {opts.checkpoint!r} is a {what}; supported text-to-image "
            f"pipelines: {supported}"
        )
    fam = FAMILIES[facts.family]
    if opts.family not in ("auto", fam.name):
        raise ConfigError(
            f"{KEY}.family: {opts.family!r}, but {opts.checkpoint!r} is a {facts.pipeline} "
            f"({fam.name!r}); set family: {fam.name} or auto"
        )
    # 2. The licence, 3. the family's options.
    check_licence(opts, facts.licence)
    check_family_options(opts, fam)
    # 4. Guidance the checkpoint would ignore.
    if fam.name == "flux" and not facts.config.get("guidance_embeds") and opts.guidance:
        raise ConfigError(
            f"{KEY}.guidance: {opts.checkpoint!r} is guidance-free (a FLUX.1 [schnell]-type "
            "transformer without guidance embedding, no classifier-free guidance); set 0"
        )
    if fam.name == "flux2" and facts.config.get("is_distilled") and opts.guidance:
        raise ConfigError(
            f"{KEY}.guidance: {opts.checkpoint!r} is step-distilled (is_distilled): the "
            "pipeline ignores guidance; set 0"
        )
    return fam


def check_licence(opts: DiffusersGeneratorParams, licence: str | None) -> None:
    """Refuse a non-commercial ``licence`` unless ``accept_noncommercial``."""
    if is_noncommercial(licence) and not opts.accept_noncommercial:
        raise ConfigError(
            f"{KEY}.accept_noncommercial: {opts.checkpoint!r} is under a non-commercial "
            f"licence ({licence}); set it to true to accept its terms, or use a checkpoint "
            "that allows commercial use (e.g. black-forest-labs/FLUX.1-schnell)"
        )


def check_family_options(opts: DiffusersGeneratorParams, fam: Family) -> None:
    """Refuse the options ``fam`` cannot honour: the inpainting counterfactual without
    cross-attention, a scheduler swap on a flow-matching model, the safety checker or
    attention slicing where the pipeline has none, a negative prompt FLUX would ignore."""
    if opts.counterfactual_mode == "inpaint" and not fam.cross_attention:
        raise ConfigError(
            f"{KEY}.counterfactual_mode: inpaint records UNet cross-attention; {fam.label} "
            f"({fam.name}) has joint attention, which it does not record: use prompt_swap"
        )
    if opts.scheduler != "default" and not fam.schedulers:
        raise ConfigError(
            f"{KEY}.scheduler: {opts.scheduler!r} cannot drive {fam.label}'s flow-matching "
            "transformer; set scheduler: default (its own FlowMatchEulerDiscreteScheduler)"
        )
    if opts.safety_checker and not fam.safety_checker:
        raise ConfigError(f"{KEY}.safety_checker: {fam.label} pipelines have none; set false")
    if opts.attention_slicing and fam.denoiser != "unet":
        raise ConfigError(
            f"{KEY}.attention_slicing: only UNet pipelines slice attention; set false for "
            f"{fam.label}"
        )
    if fam.name in ("flux", "flux2") and opts.negative_prompt:
        raise ConfigError(
            f"{KEY}.negative_prompt: {fam.label} pipelines here take no negative prompt; set ''"
        )


def check_source(opts: DiffusersGeneratorParams, source: str) -> str:
    """The pre-flight's and the constructor's check of ``opts`` against the checkpoint at
    ``source`` (resolved), before any weight loads; returns what it is ("a FluxPipeline
    (flux), apache-2.0"). With no ``model_index.json`` on disk (an uncached hub id): the
    licence of a documented id (:data:`LICENCES`) and, for a named ``family``, its options;
    the rest is checked when the pipeline loads."""
    facts = read_facts(source)
    if facts is not None:
        fam = check_params(opts, facts)
        return f"a {facts.pipeline} ({fam.name}), {facts.licence or 'licence unknown'}"
    licence = LICENCES.get(opts.checkpoint)
    check_licence(opts, licence)
    if opts.family != "auto":
        check_family_options(opts, FAMILIES[opts.family])
    named = f" ({opts.family})" if opts.family != "auto" else ""
    return f"a diffusers pipeline{named}" + (f", {licence}" if licence else "")
