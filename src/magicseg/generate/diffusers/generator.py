"""The pair generator: batches of records -> pipeline calls -> :class:`Pair` s."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from magicseg.core.config import GenerateParams
from magicseg.core.devices import resolve_device, resolve_dtype
from magicseg.core.errors import ConfigError, DataError
from magicseg.core.seeding import derive_seed
from magicseg.generate.base import Pair, PromptRecord
from magicseg.generate.diffusers.families import FAMILIES, Family, check_source, family_of
from magicseg.generate.diffusers.inpaint import (
    CrossAttentionRecorder,
    attention_factors,
    attention_region,
    class_token_positions,
    load_inpaint_pipeline,
    repaint,
)
from magicseg.generate.diffusers.loading import (
    load_pipeline,
    prepare_pipeline,
    resolve_model_source,
    to_uint8,
)

CUDA_MAX_IMAGES_PER_CALL = 32
"""``images_per_call: auto`` on a GPU: the whole batch, at most this many images (64 UNet rows
with guidance), beyond which a GPU gains no throughput, only memory (SD 1.5 at 512 px)."""

CPU_MAX_IMAGES_PER_CALL = 8
"""``images_per_call: auto`` on a CPU: the whole batch, at most this many images.
``benchmarks/generate.py --device cpu`` (a 35M-parameter SD 1.5-layout UNet, 128 px, 6 steps,
2 cores): 2, 4 and 8 images per call gave 1.3x, 1.6x and 1.7x the naive loop's pairs/s on quiet
cores, 1.6x, 2.1x and 2.9x on cores shared with other jobs; one image per call 1.0x. The gain
flattens from 4 to 8 while memory grows with every row."""


class DiffusersPairGenerator:
    """Diffusion pairs (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2): positive + counterfactual from
    the same initial latents, in the layout of the checkpoint's family (:mod:`.families`).

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
        # 2. The family, licence and options: from the files on disk before any weight loads
        #    (an uncached hub id: from the named family now, the rest once loaded).
        self._family: Family | None = None
        if pipeline is None:
            check_source(self.opts, resolve_model_source(self.opts.checkpoint))
        else:
            self._family = prepare_pipeline(pipeline, self.opts, self.device, self.opts.checkpoint)
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
    def family(self) -> Family:
        """The loaded checkpoint's family (checked against the params when it loaded)."""
        if self._family is None:
            self._family = FAMILIES[str(family_of(type(self.pipe).__name__))]
        return self._family

    @property
    def denoiser(self):
        """The pipeline's UNet or transformer."""
        return getattr(self.pipe, self.family.denoiser)

    @property
    def images_per_call(self) -> int:
        """Images per pipeline call (a pair's two images count apart)."""
        n = self.opts.images_per_call
        if n == "auto":
            cap = CPU_MAX_IMAGES_PER_CALL if self.device.type == "cpu" else CUDA_MAX_IMAGES_PER_CALL
            return min(2 * self.params.batch_size, cap)
        return n

    def noise(self, seeds: Sequence[int]):
        """The initial latents of ``seeds``, one row each, in the layout the pipeline's
        ``latents=`` takes (:attr:`.families.Family.latent_layout`)."""
        import torch

        p, fam = self.params, self.family
        return torch.cat(
            [
                fam.noise(self.pipe, s, p.height, p.width, self.device, self.denoiser.dtype)
                for s in seeds
            ]
        )

    def check(self, records: Sequence[PromptRecord]) -> None:
        """Load the model and check every record, before any image is made."""
        # 1. The model (raises BackendError when weights are missing).
        pipe = self.pipe
        f = self.family.size_multiple(pipe)
        for key in ("height", "width"):
            if getattr(self.params, key) % f:
                raise ConfigError(
                    f"generate.{key}: must be a multiple of {f} for {self.family.label} "
                    f"(got {getattr(self.params, key)})"
                )
        # 2. The inpainting counterfactual: cross-attention to record, a tokenizer with offsets.
        if self.opts.counterfactual_mode == "inpaint":
            if not attention_factors(pipe.unet):
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

        pipe = self.pipe
        f = pipe.vae_scale_factor
        latent_hw = (self.params.height // f, self.params.width // f)
        k = self.images_per_call
        images: list[np.ndarray] = []
        nsfw: list[bool | None] = []
        maps: list[list[np.ndarray | None]] = []
        recorder = (
            CrossAttentionRecorder(pipe.unet, latent_hw, attention_factors(pipe.unet))
            if record is not None
            else None
        )
        with torch.inference_mode(), recorder or nullcontext():
            for i in range(0, len(prompts), k):
                chunk = slice(i, min(i + k, len(prompts)))
                if recorder is not None:
                    recorder.reset(len(prompts[chunk]))
                out = self.call(prompts[chunk], seeds[chunk])
                images += [to_uint8(im) for im in out.images]
                flags = getattr(out, "nsfw_content_detected", None)
                nsfw += list(flags) if flags is not None else [None] * len(out.images)
                if recorder is not None:
                    size = (self.params.height, self.params.width)
                    maps += recorder.maps(record[chunk], size)  # type: ignore[index]
        return images, nsfw, maps

    def call(self, prompts: Sequence[str], seeds: Sequence[int]):
        """One pipeline call: ``prompts[i]`` from the initial latents of ``seeds[i]``
        (:meth:`noise`). Returns the pipeline's output, ``images`` N x H x W x 3 float in
        [0, 1]."""
        import torch

        o, n = self.opts, len(prompts)
        extra = {"negative_prompt": [o.negative_prompt] * n} if o.negative_prompt else {}
        return self.pipe(
            prompt=list(prompts),
            latents=self.noise(seeds),
            # per-image generators: stochastic schedulers (euler_a) draw the same step noise
            # for a pair's two images, whatever the chunking
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            num_inference_steps=o.steps,
            guidance_scale=o.guidance,
            height=self.params.height,
            width=self.params.width,
            output_type="np",
            **extra,
        )

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

    def meta(self) -> dict[str, Any]:
        """Backend facts shared by every pair (JSON-serialisable)."""
        pipe = self.pipe
        return {
            "model": self.opts.checkpoint,
            "pipeline": type(pipe).__name__,
            "family": self.family.name,
            "scheduler": type(pipe.scheduler).__name__,
            "steps": self.opts.steps,
            "guidance": self.opts.guidance,
            "height": self.params.height,
            "width": self.params.width,
            "dtype": str(self.denoiser.dtype).removeprefix("torch."),
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
