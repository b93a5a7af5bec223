"""The inpainting counterfactual (``counterfactual_mode: inpaint``) of the UNet families:
record the class words' cross-attention while the positive is painted
(:class:`CrossAttentionRecorder`, DAAM-style), threshold and dilate it into the object region
(:func:`attention_region`), repaint that region from the counterfactual prompt with the same
noise (:func:`repaint`) and paste it back. Transformer families (SD3, FLUX) attend jointly to
text and image tokens; the recorder does not know that attention and they refuse the mode
(:func:`.families.check_params`)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from magicseg.core.config import DiffusersGeneratorParams
from magicseg.core.errors import BackendError, DataError
from magicseg.generate.diffusers.loading import load_pipeline, set_scheduler, to_uint8
from magicseg.generate.diffusers.unet import initial_latents


def attention_factors(unet) -> tuple[int, ...]:
    """Downsampling factors (of the latent grid) whose cross-attention makes the region:
    2 and 4 (16x16 and 32x32 for SD 1.5 at 512 px, DAAM's resolutions), or every level
    with cross-attention when the UNet has none there."""
    cfg = unet.config
    levels = {2**i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t}
    if "CrossAttn" in str(cfg.mid_block_type or ""):
        levels.add(2 ** (len(cfg.down_block_types) - 1))
    return tuple(f for f in sorted(levels) if f in (2, 4)) or tuple(sorted(levels))


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
