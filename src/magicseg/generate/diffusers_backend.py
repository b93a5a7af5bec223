"""The ``diffusers`` pair generator: Stable Diffusion positives and counterfactuals, fast.

For each prompt record the positive and the counterfactual image start from **the same initial
latents**, drawn on the CPU from one generator seeded with ``PromptRecord.seed``; a sample's pair
therefore depends neither on the batch size nor on the process or device that made it (up to
the last bit, see below), and the two images differ mainly where the prompts differ (the
object). The official MagicSeg code draws independent noise for the two images:
``pair_noise: independent`` does so too, reproducibly (the counterfactual's seed is the stream
``generate.cf_noise`` of the record's seed, :func:`counterfactual_seed`).

Counterfactuals (``counterfactual_mode``): ``prompt_swap`` paints the counterfactual prompt from
the shared noise; ``inpaint`` records the cross-attention of the class words while the positive
is painted (:class:`CrossAttentionRecorder`, DAAM-style), thresholds and dilates it into the
object region (:func:`attention_region`), repaints that region from the counterfactual prompt
with the same noise (:func:`repaint`) and pastes it back: outside ``Pair.cf_region`` the
counterfactual is the positive, byte for byte. Both cost two images of UNet work per pair.

Speed: the positives and counterfactuals of several records go through one pipeline call, so
with classifier-free guidance each UNet step sees ``2 x images`` rows (``4 x pairs`` when a whole
batch goes in one call). ``images_per_call: auto`` is the whole batch, at most 32 images on a GPU
and at most 8 on a CPU, where ``benchmarks/generate.py`` measured 8 images per call 1.7x faster
than the naive loop (2.9x on loaded cores; a reduced SD 1.5-layout UNet at 128 px, 2 cores). On
CUDA: bf16 (fp16 where bf16 is missing), PyTorch SDPA attention (diffusers' default
``AttnProcessor2_0``), channels-last, optional ``torch.compile`` of the UNet, and a DPM-Solver++
multistep scheduler. Images that share a call can differ in the last bit (1/255 of a pixel) from
the same images made in another grouping (batched float kernels); ``batch_size: 1`` makes every
call one record's images, whatever else changes.

Models: any UNet-based diffusers text-to-image checkpoint (SD 1.x, SD 2.x, SDXL, SD-Turbo /
SDXL-Turbo), by hub id or local directory. Few-step models want ``scheduler: default``,
``steps: 1..4``, ``guidance: 0``. The safety checker is off unless ``safety_checker: true``
(it blacks out flagged images, which would poison a segmentation dataset silently; the flag is
recorded in ``Pair.meta["nsfw"]`` when it is on).

Heavy imports (torch, diffusers) happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from magicseg.core.config import DiffusersGeneratorParams, GenerateParams
from magicseg.core.devices import resolve_device, resolve_dtype
from magicseg.core.errors import BackendError, ConfigError, DataError
from magicseg.core.seeding import derive_seed
from magicseg.generate.base import Pair, PromptRecord

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

CUDA_MAX_IMAGES_PER_CALL = 32
"""``images_per_call: auto`` on a GPU: the whole batch, at most this many images (64 UNet rows
with guidance), beyond which a GPU gains no throughput, only memory (SD 1.5 at 512 px)."""

CPU_MAX_IMAGES_PER_CALL = 8
"""``images_per_call: auto`` on a CPU: the whole batch, at most this many images.
``benchmarks/generate.py --device cpu`` (a 35M-parameter SD 1.5-layout UNet, 128 px, 6 steps,
2 cores): 2, 4 and 8 images per call gave 1.3x, 1.6x and 1.7x the naive loop's pairs/s on quiet
cores, 1.6x, 2.1x and 2.9x on cores shared with other jobs; one image per call 1.0x. The gain
flattens from 4 to 8 while memory grows with every row."""


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

    Wraps hub/filesystem failures in :class:`BackendError` with the model named.
    """
    import diffusers
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    key = "generate.diffusers.inpaint_checkpoint" if inpaint else "generate.diffusers.checkpoint"
    source = resolve_model_source(model or opts.checkpoint, key)
    auto = AutoPipelineForInpainting if inpaint else AutoPipelineForText2Image
    # diffusers >= 0.42 renamed torch_dtype -> dtype (the old name warns)
    new_api = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42)
    kwargs: dict[str, Any] = {"dtype" if new_api else "torch_dtype": dtype}
    if not opts.safety_checker:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(
            f"{key}: cannot load {source!r} ({first}); give a hub id (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers pipeline directory"
        ) from None
    prepare_pipeline(pipe, opts, device)
    return pipe


def prepare_pipeline(pipe, opts: DiffusersGeneratorParams, device) -> None:
    """Scheduler, device, memory format, attention and compile settings on a loaded pipeline."""
    import torch

    if getattr(pipe, "unet", None) is None:
        raise BackendError(
            f"generate.diffusers.checkpoint: {type(pipe).__name__} has no UNet; only UNet-based "
            "pipelines (SD 1.x/2.x, SDXL, SD-Turbo) are supported"
        )
    set_scheduler(pipe, opts.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        # decode one image at a time: a batched 512 px VAE decode costs GBs per image
        if hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()
    if opts.attention_slicing:
        pipe.enable_attention_slicing()
    if opts.compile:
        pipe.unet = torch.compile(pipe.unet)


# --------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------
def initial_latents(seed: int, shape: tuple[int, ...], device, dtype):
    """1xCxhxw standard-normal latents from a CPU generator seeded with ``seed``.

    The same call the pipeline makes for ``generator=torch.Generator("cpu").manual_seed(seed)``
    and batch 1, so the naive per-image loop and the batched path start from identical noise.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor((1, *shape), generator=gen, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------------
class DiffusersPairGenerator:
    """Stable Diffusion pairs: positive + counterfactual from the same initial latents.

    ``generate(batch)`` returns one :class:`Pair` per record (HWC uint8 RGB images,
    ``oracle_mask`` None, ``meta`` with model, scheduler, steps, guidance, size, dtype, device,
    seed and seconds per pair). ``pipeline`` lets a caller (tests, benchmarks) pass an already
    built pipeline; otherwise the model loads on the first ``check``/``generate``.
    """

    name = "diffusers"

    def __init__(self, params: GenerateParams, pipeline=None) -> None:
        # 1. Cheap checks first: device, dtype, size, model source (no weights loaded yet).
        self.params = params
        self.opts = params.diffusers
        self.device = resolve_device(self.opts.device, "generate.diffusers.device")
        self.dtype = resolve_dtype(self.opts.dtype, self.device, "generate.diffusers.dtype")
        for key in ("height", "width"):
            if getattr(params, key) % 8:
                raise ConfigError(
                    f"generate.{key}: must be a multiple of 8 for diffusers "
                    f"(got {getattr(params, key)})"
                )
        if pipeline is None:
            resolve_model_source(self.opts.checkpoint)
        else:
            prepare_pipeline(pipeline, self.opts, self.device)
        if self.opts.counterfactual_mode == "inpaint" and self.opts.inpaint_checkpoint:
            resolve_model_source(
                self.opts.inpaint_checkpoint, "generate.diffusers.inpaint_checkpoint"
            )
        self._pipe = pipeline
        self._inpaint_pipe = None

    # ---------------------------------------------------------------------------------------
    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.opts, self.device, self.dtype)
        return self._pipe

    @property
    def images_per_call(self) -> int:
        """Images per pipeline call (a pair's two images count apart)."""
        n = self.opts.images_per_call
        if n == "auto":
            cap = CPU_MAX_IMAGES_PER_CALL if self.device.type == "cpu" else CUDA_MAX_IMAGES_PER_CALL
            return min(2 * self.params.batch_size, cap)
        return n

    def latent_shape(self) -> tuple[int, int, int]:
        pipe = self.pipe
        f = pipe.vae_scale_factor
        return (pipe.unet.config.in_channels, self.params.height // f, self.params.width // f)

    def check(self, records: Sequence[PromptRecord]) -> None:
        """Load the model and check every record, before any image is made."""
        # 1. The model (raises BackendError when weights are missing).
        pipe = self.pipe
        f = pipe.vae_scale_factor
        for key in ("height", "width"):
            if getattr(self.params, key) % f:
                raise ConfigError(
                    f"generate.{key}: must be a multiple of the VAE factor {f} "
                    f"(got {getattr(self.params, key)})"
                )
        # 2. The inpainting counterfactual: cross-attention to record, a tokenizer with offsets.
        if self.opts.counterfactual_mode == "inpaint":
            if not self.attention_factors():
                raise ConfigError(
                    "generate.diffusers.counterfactual_mode: inpaint finds the object by the "
                    f"UNet's cross-attention, and {type(pipe.unet).__name__} has none "
                    "(use prompt_swap)"
                )
            class_token_positions(pipe.tokenizer, "a test", ["test"])  # raises if unsupported
            self.inpaint_pipe  # noqa: B018 - loads it (errors before any image)
        # 3. The records.
        for rec in records:
            if not rec.prompt.strip() or not rec.cf_prompt.strip():
                raise DataError(f"prompt {rec.id}: empty prompt or counterfactual prompt")
            if not 0 <= rec.seed < 2**63:
                raise DataError(f"prompt {rec.id}: seed {rec.seed} outside [0, 2**63)")

    # ---------------------------------------------------------------------------------------
    def generate(self, batch: Sequence[PromptRecord]) -> list[Pair]:
        """Paint each record's positive and counterfactual (shared initial latents, or the
        counterfactual's own with ``pair_noise: independent``).

        ``prompt_swap``: both images painted from their prompts. ``inpaint``: the positive
        painted while its class words' cross-attention is recorded, then the object region
        (see :func:`attention_region`) repainted from the counterfactual prompt and pasted
        back, so outside ``Pair.cf_region`` the counterfactual is the positive, byte for byte.
        """
        if not batch:
            return []
        start = time.perf_counter()
        if self.opts.counterfactual_mode == "inpaint":
            positives, counterfactuals, regions, nsfw = self._generate_inpaint(batch)
        else:
            prompts = [p for rec in batch for p in (rec.prompt, rec.cf_prompt)]
            seeds = [s for rec in batch for s in (rec.seed, self.counterfactual_seed(rec))]
            images, flags, _ = self._paint(prompts, seeds)
            positives, counterfactuals = images[0::2], images[1::2]
            nsfw = [[flags[2 * j], flags[2 * j + 1]] for j in range(len(batch))]
            regions = [None] * len(batch)
        seconds = (time.perf_counter() - start) / len(batch)

        # Pairs with their facts.
        meta = self.meta()
        pairs = []
        for j, rec in enumerate(batch):
            m = {**meta, "seed": rec.seed, "seconds": round(seconds, 4)}
            if self.opts.pair_noise == "independent":
                m["cf_seed"] = self.counterfactual_seed(rec)
            if self.opts.safety_checker:
                m["nsfw"] = nsfw[j]
            if regions[j] is not None:
                m["cf_region_fraction"] = round(float(regions[j].mean()), 5)
            pairs.append(
                Pair(
                    positive=positives[j],
                    counterfactual=counterfactuals[j],
                    meta=m,
                    cf_region=regions[j],
                )
            )
        return pairs

    def counterfactual_seed(self, rec: PromptRecord) -> int:
        """The seed of a record's counterfactual noise: its own seed (``pair_noise: shared``)
        or the stream ``generate.cf_noise`` of it (``independent``)."""
        if self.opts.pair_noise == "shared":
            return rec.seed
        return derive_seed(rec.seed, "generate.cf_noise")

    def _paint(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        record: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> tuple[list[np.ndarray], list[bool | None], list[list[np.ndarray | None]]]:
        """Text-to-image: ``prompts[i]`` from the initial latents of ``seeds[i]``, at most
        ``images_per_call`` images per pipeline call (CFG doubles the UNet rows).

        ``record``: per image, per class, the token positions whose cross-attention to keep;
        then each image's per-class HxW attention maps come back (None for a class without
        tokens). Returns (HWC uint8 images, NSFW flags, maps).
        """
        import torch

        pipe, o = self.pipe, self.opts
        shape = self.latent_shape()
        k = self.images_per_call
        images: list[np.ndarray] = []
        nsfw: list[bool | None] = []
        maps: list[list[np.ndarray | None]] = []
        recorder = (
            CrossAttentionRecorder(pipe.unet, shape[1:], self.attention_factors())
            if record is not None
            else None
        )
        with torch.inference_mode(), recorder or _nothing():
            for i in range(0, len(prompts), k):
                chunk = slice(i, min(i + k, len(prompts)))
                if recorder is not None:
                    recorder.reset(len(prompts[chunk]))
                out = pipe(
                    prompt=list(prompts[chunk]),
                    negative_prompt=(
                        [o.negative_prompt] * len(prompts[chunk]) if o.negative_prompt else None
                    ),
                    latents=torch.cat(
                        [
                            initial_latents(s, shape, self.device, pipe.unet.dtype)
                            for s in seeds[chunk]
                        ]
                    ),
                    # per-image generators: stochastic schedulers (euler_a) draw the same step
                    # noise for a pair's two images, whatever the chunking
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]],
                    num_inference_steps=o.steps,
                    guidance_scale=o.guidance,
                    height=self.params.height,
                    width=self.params.width,
                    output_type="np",
                )
                images += [to_uint8(im) for im in out.images]
                flags = getattr(out, "nsfw_content_detected", None)
                nsfw += list(flags) if flags is not None else [None] * len(out.images)
                if recorder is not None:
                    size = (self.params.height, self.params.width)
                    maps += recorder.maps(record[chunk], size)  # type: ignore[index]
        return images, nsfw, maps

    def _generate_inpaint(self, batch: Sequence[PromptRecord]):
        """(positives, counterfactuals, regions, NSFW flags) of ``counterfactual_mode: inpaint``."""
        o = self.opts
        # 1. Positives, recording the cross-attention of each class's tokens.
        tokens = [
            class_token_positions(self.pipe.tokenizer, r.prompt, r.class_names) for r in batch
        ]
        positives, flags, maps = self._paint(
            [r.prompt for r in batch], [r.seed for r in batch], record=tokens
        )
        # 2. The object regions: thresholded, dilated attention maps (union over classes).
        size = (self.params.height, self.params.width)
        regions = [attention_region(m, size, o.inpaint_threshold, o.inpaint_dilate) for m in maps]
        # 3. Repaint each region from the counterfactual prompt, same seed; paste it back. An
        #    empty region (class words truncated away) leaves the positive: the pair says so
        #    (cf_region_fraction 0) and the labeler's checks and the filter drop it.
        todo = [j for j, region in enumerate(regions) if region.any()]
        for j in sorted(set(range(len(batch))) - set(todo)):
            print(
                f"warning: prompt {batch[j].id}: no object region (its class words lie beyond "
                f"the {self.pipe.tokenizer.model_max_length}-token prompt); counterfactual = "
                "positive",
                file=sys.stderr,
            )
        counterfactuals = [pos.copy() for pos in positives]
        nsfw = [[flag, None] for flag in flags]
        k = self.images_per_call
        for i in range(0, len(todo), k):
            chunk = todo[i : i + k]
            cfs, cf_flags = repaint(
                self.inpaint_pipe,
                [positives[j] for j in chunk],
                [regions[j] for j in chunk],
                [batch[j].cf_prompt for j in chunk],
                [batch[j].seed for j in chunk],
                steps=o.steps,
                guidance=o.guidance,
                negative_prompt=o.negative_prompt,
            )
            for j, cf, flag in zip(chunk, cfs, cf_flags, strict=True):
                counterfactuals[j] = cf
                nsfw[j][1] = flag
        return positives, counterfactuals, regions, nsfw

    @property
    def inpaint_pipe(self):
        """The pipeline that repaints regions (``counterfactual_mode: inpaint``), made once."""
        if self._inpaint_pipe is None:
            self._inpaint_pipe = load_inpaint_pipeline(
                self.opts, self.device, self.dtype, text2img=self.pipe
            )
        return self._inpaint_pipe

    def attention_factors(self) -> tuple[int, ...]:
        """Downsampling factors (of the latent grid) whose cross-attention makes the region:
        2 and 4 (16x16 and 32x32 for SD 1.5 at 512 px, DAAM's resolutions), or every level
        with cross-attention when the UNet has none there."""
        cfg = self.pipe.unet.config
        levels = {2**i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t}
        if "CrossAttn" in str(cfg.mid_block_type or ""):
            levels.add(2 ** (len(cfg.down_block_types) - 1))
        return tuple(f for f in sorted(levels) if f in (2, 4)) or tuple(sorted(levels))

    def meta(self) -> dict[str, Any]:
        """Backend facts shared by every pair (JSON-serialisable)."""
        pipe = self.pipe
        return {
            "model": self.opts.checkpoint,
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "steps": self.opts.steps,
            "guidance": self.opts.guidance,
            "height": self.params.height,
            "width": self.params.width,
            "dtype": str(pipe.unet.dtype).removeprefix("torch."),
            "device": str(self.device),
            "images_per_call": self.images_per_call,
            "compile": self.opts.compile,
            "negative_prompt": self.opts.negative_prompt,
            "counterfactual_mode": self.opts.counterfactual_mode,
            "shared_latents": self.opts.pair_noise == "shared",
        } | (
            {
                "inpaint_checkpoint": self.opts.inpaint_checkpoint,
                "inpaint_threshold": self.opts.inpaint_threshold,
                "inpaint_dilate": self.opts.inpaint_dilate,
                "inpaint_pipeline": type(self.inpaint_pipe).__name__,
            }
            if self.opts.counterfactual_mode == "inpaint"
            else {}
        )


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HWC float in [0, 1] -> HWC uint8 (round half up, clipped)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the inpainting counterfactual
# --------------------------------------------------------------------------------------------
@contextmanager
def _nothing() -> Iterator[None]:
    yield


def class_token_positions(tokenizer, prompt: str, names: Sequence[str]) -> list[list[int]]:
    """Per class name, the positions of its tokens in ``prompt`` as the pipeline encodes it
    (padded/truncated to ``tokenizer.model_max_length``; position 0 = the start token).

    A mention is any singular or plural form of the name, whole words
    (:func:`magicseg.prompts.counterfactual.name_forms`), without its article; a token belongs
    to the class when its characters overlap a mention. A class mentioned only beyond the
    truncation has no tokens (an empty list).
    """
    from magicseg.prompts.counterfactual import name_forms

    try:
        enc = tokenizer(
            prompt,
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_offsets_mapping=True,
        )
    except (NotImplementedError, ValueError, TypeError) as err:
        raise BackendError(
            f"generate.diffusers.counterfactual_mode: inpaint needs a fast tokenizer with "
            f"offsets, {type(tokenizer).__name__} has none ({err})"
        ) from None
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    out = []
    for name in names:
        alts = "|".join(
            r"\s+".join(map(re.escape, f.split())) for f in name_forms(str(name).lower())
        )
        spans = [
            m.span()
            for m in re.finditer(rf"(?<![\w-])(?:{alts})(?![\w-])", prompt, flags=re.IGNORECASE)
        ]
        out.append(
            [
                i
                for i, (a, b) in enumerate(offsets)
                if b > a and any(a < hi and b > lo for lo, hi in spans)
            ]
        )
    return out


class CrossAttentionRecorder:
    """Accumulates, over one pipeline call, each image's softmax cross-attention to the prompt
    tokens, averaged over heads, summed over layers and denoising steps, at the downsampling
    ``factors`` of the ``latent_hw`` grid (DAAM, Tang et al. 2023).

    Use as a context manager around the calls (it wraps the UNet's cross-attention processors
    and restores them); :meth:`reset` with the number of images before each call, then
    :meth:`maps`. The wrapped processors compute the attention output exactly as before: the
    probabilities are recomputed beside it from the conditional rows (the last ``n`` of a
    classifier-free-guidance batch), so the images are the same with or without a recorder.
    """

    def __init__(self, unet, latent_hw: tuple[int, int], factors: Sequence[int]) -> None:
        self.unet = unet
        self.grids: dict[int, tuple[int, int]] = {}  # sequence length -> (h, w) at a factor
        for f in factors:
            h, w = -(-latent_hw[0] // f), -(-latent_hw[1] // f)
            self.grids[h * w] = (h, w)
        self.n = 0
        self.sums: dict[int, Any] = {}
        self.calls = 0
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> CrossAttentionRecorder:
        self._saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(
            {
                name: _RecordingProcessor(proc, self) if ".attn2." in name else proc
                for name, proc in self._saved.items()
            }
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    def reset(self, n: int) -> None:
        """Start a call of ``n`` images."""
        self.n, self.sums, self.calls = n, {}, 0

    def record(self, attn, hidden_states, encoder_hidden_states) -> None:
        """One cross-attention call: BxNxC queries, BxTxC' text states (B = n or 2n rows)."""
        import torch

        rows, length = hidden_states.shape[0], hidden_states.shape[1]
        if hidden_states.ndim != 3 or length not in self.grids or rows not in (self.n, 2 * self.n):
            return
        h = hidden_states[rows - self.n :]
        e = encoder_hidden_states[rows - self.n :]
        if attn.norm_cross:
            e = attn.norm_encoder_hidden_states(e)
        q, k = attn.to_q(h), attn.to_k(e)
        heads = attn.heads
        d = k.shape[-1] // heads
        q = q.view(self.n, -1, heads, d).transpose(1, 2)
        k = k.view(self.n, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        probs = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(-1)
        probs = probs.mean(1)  # n x N x T
        self.sums[length] = self.sums[length] + probs if length in self.sums else probs
        self.calls += 1

    def maps(
        self, tokens: Sequence[Sequence[Sequence[int]]], size: tuple[int, int]
    ) -> list[list[np.ndarray | None]]:
        """Per image of the last call, per class (its token positions), the HxW float32 map:
        the mean over the class's tokens of the recorded attention, each resolution bilinearly
        upsampled to ``size``, averaged over every recorded layer and step. None for a class
        without tokens."""
        import torch
        import torch.nn.functional as F

        if not self.calls:
            raise BackendError(
                "generate.diffusers.counterfactual_mode: inpaint recorded no cross-attention "
                "(a UNet without text cross-attention at the recorded resolutions?)"
            )
        out = []
        for j, per_class in enumerate(tokens):
            row = []
            for idx in per_class:
                if not idx:
                    row.append(None)
                    continue
                total = torch.zeros(size, dtype=torch.float32)
                for length, acc in self.sums.items():
                    m = acc[j][:, list(idx)].mean(-1).reshape(1, 1, *self.grids[length]).cpu()
                    total += F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
                row.append((total / self.calls).numpy())
            out.append(row)
        return out


class _RecordingProcessor:
    """An attention processor that runs ``inner`` and shows the call to the recorder."""

    def __init__(self, inner, recorder: CrossAttentionRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
        *args, **kwargs,
    ):  # fmt: skip
        out = self.inner(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )
        if encoder_hidden_states is not None:
            self.recorder.record(attn, hidden_states, encoder_hidden_states)
        return out


def attention_region(
    maps: Sequence[np.ndarray | None], size: tuple[int, int], threshold: float, dilate: int
) -> np.ndarray:
    """The region to repaint: the union over classes of each HxW map (``size``), min-max
    normalised, above ``threshold``; dilated by ``dilate`` pixels. HW bool, empty when no
    class has a map (its words lie beyond the prompt's truncation)."""
    region = np.zeros(size, bool)
    for m in maps:
        if m is None:
            continue
        lo, hi = float(m.min()), float(m.max())
        if hi > lo:
            region |= (m - lo) / (hi - lo) > threshold
    return dilate_mask(region, dilate)


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """HW bool mask grown by a disk of ``radius`` pixels."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if radius <= 0 or not mask.any():
        return mask
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(mask, structure=(yy**2 + xx**2) <= radius**2)


def cover_cells(mask: np.ndarray, cell: int) -> np.ndarray:
    """HW bool mask -> every ``cell`` x ``cell`` block (the latent grid) touching it, whole."""
    h, w = mask.shape
    hh, ww = -(-h // cell), -(-w // cell)
    padded = np.zeros((hh * cell, ww * cell), bool)
    padded[:h, :w] = mask
    cells = padded.reshape(hh, cell, ww, cell).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, cell, 0), cell, 1)[:h, :w]


def load_inpaint_pipeline(opts: DiffusersGeneratorParams, device, dtype, text2img=None):
    """The inpainting pipeline: ``opts.inpaint_checkpoint`` when set (a dedicated 9-channel
    inpainting checkpoint repaints best), else the text-to-image pipeline's own components
    (``AutoPipelineForInpainting.from_pipe``: no extra memory, latent blending at each step)."""
    from diffusers import AutoPipelineForInpainting

    if opts.inpaint_checkpoint:
        return load_pipeline(opts, device, dtype, model=opts.inpaint_checkpoint, inpaint=True)
    if text2img is None:
        text2img = load_pipeline(opts, device, dtype)
    pipe = AutoPipelineForInpainting.from_pipe(text2img)
    set_scheduler(pipe, opts.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def repaint(
    pipe,
    positives: Sequence[np.ndarray],
    regions: Sequence[np.ndarray],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance: float = 7.5,
    negative_prompt: str = "",
) -> tuple[list[np.ndarray], list[bool | None]]:
    """Repaint ``regions[i]`` (HW bool) of ``positives[i]`` (HWC uint8, H and W multiples of
    the VAE factor) from ``prompts[i]``, in one inpainting-pipeline call.

    Each image starts from the initial latents of ``seeds[i]`` (those of its positive) with a
    CPU generator of that seed; the pipeline repaints every latent cell the region touches
    (strength 1), and only the region's pixels are pasted onto the positive, so outside it
    the result is the positive bit for bit. Returns (HWC uint8 images, NSFW flags).
    """
    import torch
    from PIL import Image

    # 1. Check inputs.
    h, w = positives[0].shape[:2]
    for pos, region in zip(positives, regions, strict=True):
        if pos.ndim != 3 or pos.shape[2] != 3 or pos.dtype != np.uint8:
            raise DataError(f"inpaint: positive must be HWC uint8 RGB, got {pos.shape}")
        if region.shape != (h, w) or pos.shape[:2] != (h, w):
            raise DataError(f"inpaint: region {region.shape} and image {pos.shape[:2]} differ")
    f = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, h // f, w // f)

    # 2. Repaint the latent cells under each region, from the positive's own noise.
    with torch.inference_mode():
        out = pipe(
            prompt=list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            image=[Image.fromarray(p) for p in positives],
            mask_image=[Image.fromarray(cover_cells(r, f).astype(np.uint8) * 255) for r in regions],
            latents=torch.cat(
                [initial_latents(s, shape, pipe.device, pipe.unet.dtype) for s in seeds]
            ),
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            height=h,
            width=w,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        )
    flags = getattr(out, "nsfw_content_detected", None)

    # 3. Composite: the background stays the positive's own pixels.
    images = [
        np.where(region[..., None], to_uint8(im), pos)
        for im, region, pos in zip(out.images, regions, positives, strict=True)
    ]
    return images, list(flags) if flags is not None else [None] * len(images)


def inpaint_counterfactual(
    pipe,
    positive: np.ndarray,
    mask: np.ndarray,
    cf_prompt: str,
    seed: int,
    *,
    dilate: int = 8,
    steps: int = 20,
    guidance: float = 7.5,
    negative_prompt: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Repaint the dilated ``mask`` of one ``positive`` with ``cf_prompt`` (see :func:`repaint`).

    ``positive``: HWC uint8 RGB; ``mask``: HW bool/int, nonzero = object (e.g. a labeler's
    class-index mask > 0). Returns ``(counterfactual, region)``: the HWC uint8 image, equal to
    ``positive`` outside ``region`` (the HW bool dilated mask). An empty mask returns a copy.
    """
    positive = np.asarray(positive)
    if positive.ndim != 3 or positive.shape[2] != 3 or positive.dtype != np.uint8:
        raise DataError(f"inpaint: positive must be HWC uint8 RGB, got {positive.shape}")
    if mask.shape != positive.shape[:2]:
        raise DataError(f"inpaint: mask {mask.shape} does not match image {positive.shape[:2]}")
    region = dilate_mask(mask > 0, dilate)
    if not region.any():
        return positive.copy(), region
    (cf,), _ = repaint(
        pipe,
        [positive],
        [region],
        [cf_prompt],
        [seed],
        steps=steps,
        guidance=guidance,
        negative_prompt=negative_prompt,
    )
    return cf, region
