"""The ``diffusers`` pair generator: Stable Diffusion positives and counterfactuals, fast.

For each prompt record the positive and the counterfactual image start from **the same initial
latents**, drawn on the CPU from one generator seeded with ``PromptRecord.seed``; a sample's pair
therefore depends neither on the batch size nor on the process or device that made it, and the
two images differ mainly where the prompts differ (the object). The official MagicSeg code draws
independent noise for the two images.

Speed: the positives and counterfactuals of several records go through one pipeline call, so
with classifier-free guidance each UNet step sees ``2 x images`` rows (``4 x pairs`` when a whole
batch goes in one call). On CUDA the default is the whole batch per call (at most 32 images), bf16 (fp16 where bf16
is missing), PyTorch SDPA attention (diffusers' default ``AttnProcessor2_0``), channels-last,
optional ``torch.compile`` of the UNet, and a DPM-Solver++ multistep scheduler. On a CPU batching
does not pay for a realistic UNet (see ``benchmarks/generate.py``), so ``images_per_call: auto``
runs one image per call there: the same work as the naive loop, never slower.

Models: any UNet-based diffusers text-to-image checkpoint (SD 1.x, SD 2.x, SDXL, SD-Turbo /
SDXL-Turbo), by hub id or local directory. Few-step models want ``scheduler: default``,
``steps: 1..4``, ``guidance: 0``. The safety checker is off unless ``safety_checker: true``
(it blacks out flagged images, which would poison a segmentation dataset silently; the flag is
recorded in ``Pair.meta["nsfw"]`` when it is on).

Heavy imports (torch, diffusers) happen inside functions: importing this module is cheap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magicseg.core.config import DiffusersGeneratorParams, GenerateParams
from magicseg.core.devices import resolve_device, resolve_dtype
from magicseg.core.errors import BackendError, ConfigError, DataError
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
"""``images_per_call: auto`` on CUDA: the whole batch, at most this many images (64 UNet rows
with guidance), beyond which a GPU gains no throughput, only memory (SD 1.5 at 512 px)."""

CPU_IMAGES_PER_CALL = 1
"""``images_per_call: auto`` on a CPU: measured fastest by ``benchmarks/generate.py`` (batching
pairs through the UNet is slower than the naive loop on a 2-core CPU for a realistic UNet)."""


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
        self._pipe = pipeline

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
            if self.device.type == "cuda":
                return min(2 * self.params.batch_size, CUDA_MAX_IMAGES_PER_CALL)
            return CPU_IMAGES_PER_CALL
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
        # 2. The records.
        for rec in records:
            if not rec.prompt.strip() or not rec.cf_prompt.strip():
                raise DataError(f"prompt {rec.id}: empty prompt or counterfactual prompt")
            if not 0 <= rec.seed < 2**63:
                raise DataError(f"prompt {rec.id}: seed {rec.seed} outside [0, 2**63)")

    # ---------------------------------------------------------------------------------------
    def generate(self, batch: Sequence[PromptRecord]) -> list[Pair]:
        """Paint each record's positive and counterfactual (shared initial latents)."""
        import torch

        if not batch:
            return []
        pipe, o = self.pipe, self.opts
        start = time.perf_counter()

        # 1. Per-record initial latents from the record's seed; each image is (prompt, latents).
        shape = self.latent_shape()
        dtype = pipe.unet.dtype
        jobs = []
        for rec in batch:
            lat = initial_latents(rec.seed, shape, self.device, dtype)
            jobs += [(rec.prompt, lat, rec.seed), (rec.cf_prompt, lat, rec.seed)]

        # 2. Chunks of images through the pipeline (CFG doubles the UNet rows).
        k = self.images_per_call
        images: list[np.ndarray] = []
        nsfw: list[bool | None] = []
        with torch.inference_mode():
            for i in range(0, len(jobs), k):
                chunk = jobs[i : i + k]
                out = pipe(
                    prompt=[p for p, _, _ in chunk],
                    negative_prompt=[o.negative_prompt] * len(chunk) if o.negative_prompt else None,
                    latents=torch.cat([lat for _, lat, _ in chunk]),
                    # per-image generators: stochastic schedulers (euler_a) draw the same step
                    # noise for a pair's two images, whatever the chunking
                    generator=[torch.Generator("cpu").manual_seed(s) for _, _, s in chunk],
                    num_inference_steps=o.steps,
                    guidance_scale=o.guidance,
                    height=self.params.height,
                    width=self.params.width,
                    output_type="np",
                )
                images += [to_uint8(im) for im in out.images]
                flags = getattr(out, "nsfw_content_detected", None)
                nsfw += list(flags) if flags is not None else [None] * len(chunk)
        seconds = (time.perf_counter() - start) / len(batch)

        # 3. Pairs with their facts.
        meta = self.meta()
        pairs = []
        for j, rec in enumerate(batch):
            m = {**meta, "seed": rec.seed, "seconds": round(seconds, 4)}
            if self.opts.safety_checker:
                m["nsfw"] = [nsfw[2 * j], nsfw[2 * j + 1]]
            pairs.append(Pair(positive=images[2 * j], counterfactual=images[2 * j + 1], meta=m))
        return pairs

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
            "counterfactual_mode": "prompt_swap",
            "shared_latents": True,
        }


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HWC float in [0, 1] -> HWC uint8 (round half up, clipped)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the inpainting counterfactual
# --------------------------------------------------------------------------------------------
def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """HW bool mask grown by a disk of ``radius`` pixels."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if radius <= 0 or not mask.any():
        return mask
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(mask, structure=(yy**2 + xx**2) <= radius**2)


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
    """Repaint only the object's dilated mask of ``positive`` with ``cf_prompt``.

    ``positive``: HWC uint8 RGB (H, W multiples of 8); ``mask``: HW bool/int, nonzero = object
    (e.g. the labeler's class-index mask > 0). Returns ``(counterfactual, region)``: an HWC
    uint8 image equal to ``positive`` bit for bit outside ``region`` (the HW bool dilated mask;
    the VAE round trip is composited away), and ``region``. An empty mask returns a copy of
    ``positive``. Seeded by ``seed`` (CPU generator), so it is reproducible anywhere.

    A stage after ``label`` (``counterfactual_mode: inpaint``) would do, per manifest row::

        pipe = load_inpaint_pipeline(opts, device, dtype)  # once
        cf, region = inpaint_counterfactual(pipe, read_image(gen / row.image),
                                            read_mask(lab / row.mask) > 0, row.cf_prompt,
                                            row.seed, dilate=opts.inpaint_dilate,
                                            steps=opts.steps, guidance=opts.guidance,
                                            negative_prompt=opts.negative_prompt)
    """
    import torch
    from PIL import Image

    # 1. Check inputs.
    positive = np.asarray(positive)
    if positive.ndim != 3 or positive.shape[2] != 3 or positive.dtype != np.uint8:
        raise DataError(f"inpaint: positive must be HWC uint8 RGB, got {positive.shape}")
    if mask.shape != positive.shape[:2]:
        raise DataError(f"inpaint: mask {mask.shape} does not match image {positive.shape[:2]}")
    h, w = positive.shape[:2]
    region = dilate_mask(mask > 0, dilate)
    if not region.any():
        return positive.copy(), region

    # 2. Repaint the region with the counterfactual prompt.
    with torch.inference_mode():
        out = pipe(
            prompt=cf_prompt,
            negative_prompt=negative_prompt or None,
            image=Image.fromarray(positive),
            mask_image=Image.fromarray(region.astype(np.uint8) * 255),
            height=h,
            width=w,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    repainted = to_uint8(out.images[0])

    # 3. Composite: the background stays the positive's own pixels.
    return np.where(region[..., None], repainted, positive), region
