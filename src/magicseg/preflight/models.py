"""Pre-flight, part 1b: each model's config (no weights) read and checked against the params
that must fit it, so a mismatch fails before ``generate`` instead of at the stage that loads
the model hours later.

- ``train.clip.checkpoint`` (``train.architecture: clip``): a CLIP or SigLIP config; with the
  ``atm`` decoder ``train.clip.decoder_dim`` must equal the joint dimension (CLIP's
  ``projection_dim``); ``decoder_dim`` divisible by ``decoder_heads``; ``vpt_style: zegclip``
  needs a CLIP (a CLS token); the longest class prompt (the longest template filled with the
  longest class name) within the text tower's ``max_position_embeddings`` tokens;
- ``generate.diffusers.checkpoint``: the pipeline's ``model_index.json`` lists the components
  a text-to-image run loads (a denoiser, ``vae``, ``text_encoder``, ``tokenizer``,
  ``scheduler``), a ``safety_checker`` when ``generate.diffusers.safety_checker`` is on, a
  denoiser whose input channels are the VAE's latent channels (not an inpainting UNet), and
  ``generate.height``/``width`` multiples of the VAE's downsampling factor;
- ``label.grounded_sam.detector_checkpoint``: the longest class caption ("name.", with the
  names ``prompts.class_names`` sends) within Grounding DINO's ``max_text_len`` tokens (the
  detector and SAM model types are checked with the references, :mod:`magicseg.preflight`).

What would fail at a later stage is an error; what would run but silently degrade (no
safety checker to apply, a class prompt cut at the text tower's length) is a warning, as is a
config or tokenizer that cannot be read here (an uncached hub id: the reference check already
says where the model is). One :class:`Check` per item, named by the key to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from magicseg.core.config import Params
from magicseg.core.errors import MagicsegError
from magicseg.preflight.base import Check


def read_json(ref: str, filename: str) -> dict | None:
    """``filename`` of a local model directory or a hub id (the local cache, or the hub unless
    ``HF_HUB_OFFLINE``), parsed; None when it cannot be read here."""
    path = Path(ref).expanduser()
    try:
        if path.is_dir():
            file = path / filename
        else:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(ref, filename))
        return json.loads(file.read_text())
    except Exception:  # noqa: BLE001 - missing file, no network, bad JSON: not readable here
        return None


def load_tokenizer(ref: str, subfolder: str = ""):
    """The tokenizer of ``ref`` (local or cached; no weights), or None."""
    try:
        from transformers import AutoTokenizer

        kwargs = {"subfolder": subfolder} if subfolder else {}
        return AutoTokenizer.from_pretrained(ref, **kwargs)
    except Exception:  # noqa: BLE001 - no tokenizer files here
        return None


def vocabulary_names(p: Params) -> list[str]:
    """The class names the run will use (``vocabulary`` section), [] when not buildable (the
    vocabulary check reports why)."""
    from magicseg.core.vocabulary import build_vocabulary

    v = p.vocabulary
    try:
        vocab = build_vocabulary(
            v.source, v.file, holdout_combination=0, holdout_novel_words=0, limit=v.limit
        )
    except MagicsegError:
        return []
    return list(vocab.names)


def longest(names: list[str], n_tokens: Callable[[str], int]) -> tuple[str, int]:
    """The string of ``names`` with the most tokens, and that count."""
    counts = {n: n_tokens(n) for n in dict.fromkeys(names)}
    best = max(counts, key=counts.__getitem__)
    return best, counts[best]


def _tokens(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text)["input_ids"])  # with the special tokens


# --------------------------------------------------------------------------------------------
# the segmenter's CLIP
# --------------------------------------------------------------------------------------------
def check_clip(p: Params, names: list[str]) -> list:

    c, ref = p.train.clip, p.train.clip.checkpoint
    cfg = read_json(ref, "config.json")
    if cfg is None:
        return [Check("warning", "train.clip.checkpoint", f"{ref}: config not readable here")]
    kind = cfg.get("model_type")
    if kind not in ("clip", "siglip"):
        return [
            Check(
                "error",
                "train.clip.checkpoint",
                f"{ref} is a {kind!r} model, expected a 'clip' or 'siglip' checkpoint",
            )
        ]
    text = cfg.get("text_config") or {}
    if kind == "clip":
        joint = int(cfg.get("projection_dim") or 512)
        where = "projection_dim"
    else:
        joint = int(text.get("hidden_size") or 768)
        where = "text_config.hidden_size"
    out = []
    key = "train.clip.decoder_dim"
    if c.decoder == "atm" and c.decoder_dim != joint:
        msg = (
            f"the atm decoder works in CLIP's joint space: {ref} has {where} {joint}, got "
            f"{c.decoder_dim}; set train.clip.decoder_dim={joint}"
        )
        out.append(Check("error", key, msg))
    elif c.decoder_dim % c.decoder_heads:
        msg = f"{c.decoder_dim} is not divisible by train.clip.decoder_heads {c.decoder_heads}"
        out.append(Check("error", key, msg))
    else:
        out.append(Check("ok", key, f"{c.decoder_dim} ({c.decoder}; joint dim {joint})"))
    if c.vpt_style == "zegclip" and kind != "clip":
        msg = f"zegclip needs a CLIP vision tower (with a CLS token); {ref} is a {kind!r} model"
        out.append(Check("error", "train.clip.vpt_style", msg))
    out.append(_clip_text_length(p, ref, text, names))
    return out


def _clip_text_length(p: Params, ref: str, text_cfg: dict, names: list[str]):
    """The longest class prompt of training (``train.clip.templates``) and evaluation
    (``evaluate.templates``, Context's) within the text tower's positions."""
    from magicseg.core.templates import TEMPLATES, ZEGCLIP_TEMPLATES

    key = "train.clip.templates"
    limit = int(text_cfg.get("max_position_embeddings") or 77)
    tok = load_tokenizer(ref)
    if tok is None or not names:
        why = "no tokenizer readable here" if tok is None else "no class names"
        return Check("warning", key, f"class prompt lengths not checked ({why})")
    templates = list(TEMPLATES[p.train.clip.templates]) + list(p.evaluate.templates or ())
    if p.evaluate.context.enabled and p.evaluate.context.protocol == "pc60_text":
        templates += list(ZEGCLIP_TEMPLATES)
    count = _tokens(tok)
    name, _ = longest(names, count)
    prompt, n = longest([t.format(name) for t in dict.fromkeys(templates)], count)
    if n > limit:
        return Check(
            "warning",
            key,
            f"the class prompt {prompt!r} is {n} tokens, over the text tower's {limit}: it "
            "will be cut; shorten the templates or the class names",
        )
    return Check("ok", key, f"longest class prompt {n} of {limit} tokens ({prompt!r})")


# --------------------------------------------------------------------------------------------
# the Stable Diffusion pipeline
# --------------------------------------------------------------------------------------------
def check_diffusers(p: Params) -> list:

    d, key = p.generate.diffusers, "generate.diffusers.checkpoint"
    index = read_json(d.checkpoint, "model_index.json")
    if index is None:
        return [Check("warning", key, f"{d.checkpoint}: model_index.json not readable here")]

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

    denoiser = "unet" if present("unet") else "transformer"
    missing = [n for n in (denoiser, "vae", "text_encoder", "tokenizer", "scheduler")
               if not present(n)]  # fmt: skip
    if missing:
        msg = (
            f"{d.checkpoint} ({index.get('_class_name', '?')}) has no {', '.join(missing)}: "
            "not a text-to-image pipeline generate can run"
        )
        return [Check("error", key, msg)]
    out = [Check("ok", key, f"{index.get('_class_name', 'a pipeline')}: components present")]
    if d.safety_checker and not present("safety_checker"):
        msg = (
            f"true, but {d.checkpoint} ships no safety checker (model_index.json): images "
            "will not be checked"
        )
        out.append(Check("warning", "generate.diffusers.safety_checker", msg))
    vae = read_json(d.checkpoint, "vae/config.json") or {}
    net = read_json(d.checkpoint, f"{denoiser}/config.json") or {}
    # FLUX.1 and FLUX.2 pack 2x2 latent patches into one token: 4 x the VAE's channels
    packed = str(index.get("_class_name", "")).startswith("Flux")
    latent, inputs = vae.get("latent_channels"), net.get("in_channels")
    expected = latent * 4 if (latent and packed) else latent
    if latent and inputs and inputs != expected:
        msg = (
            f"{d.checkpoint}'s {denoiser} takes {inputs} input channels, its VAE makes "
            f"{latent}{' (packed 2x2: ' + str(expected) + ')' if packed else ''}: an inpainting "
            "model, not a text-to-image one"
        )
        out.append(Check("error", key, msg))
    blocks = vae.get("block_out_channels")
    if blocks:
        factor = 2 ** (len(blocks) - 1) * (2 if packed else 1)
        for side in ("height", "width"):
            value = getattr(p.generate, side)
            if value % factor:
                msg = f"{value} is not a multiple of the VAE's downsampling factor {factor}"
                out.append(Check("error", f"generate.{side}", msg))
    return out


# --------------------------------------------------------------------------------------------
# the detector's caption
# --------------------------------------------------------------------------------------------
def check_detector_text(p: Params, names: list[str]):
    """The longest single-class caption ("name.") within ``max_text_len`` (captions of several
    classes are split to fit, one name cannot be)."""
    from magicseg.core.vocabulary import display_name

    g, key = p.label.grounded_sam, "label.grounded_sam.detector_checkpoint"
    cfg = read_json(g.detector_checkpoint, "config.json")
    tok = load_tokenizer(g.detector_checkpoint)
    if cfg is None or tok is None or not names:
        return Check("warning", key, "caption lengths not checked (no config or tokenizer here)")
    limit = int(cfg.get("max_text_len") or 256)
    if p.prompts.class_names == "display":
        names = [display_name(n) for n in names]
    caption, n = longest([f"{n}." for n in names], _tokens(tok))
    if n > limit:
        return Check(
            "error",
            key,
            f"the caption {caption!r} is {n} tokens, over the detector's max_text_len {limit}",
        )
    return Check("ok", key, f"longest class caption {n} of {limit} tokens ({caption!r})")


def check_model_params(p: Params, skip: set[str] = frozenset()) -> list:
    """Every check of the module docstring for the enabled backends; models whose reference
    check failed (``skip``: their keys) are left out."""
    out = []
    names: list[str] | None = None

    def vocabulary() -> list[str]:
        nonlocal names
        if names is None:
            names = vocabulary_names(p)
        return names

    if p.generate.backend == "diffusers" and "generate.diffusers.checkpoint" not in skip:
        out += check_diffusers(p)
    gsam = p.label.backend == "grounded_sam" or p.evaluate.segmenter == "grounded_sam"
    if gsam and "label.grounded_sam.detector_checkpoint" not in skip:
        out.append(check_detector_text(p, vocabulary()))
    if p.train.architecture == "clip" and "train.clip.checkpoint" not in skip:
        out += check_clip(p, vocabulary())
    return out


__all__ = ["check_model_params"]
