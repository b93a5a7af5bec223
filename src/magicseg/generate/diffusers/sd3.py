"""Stable Diffusion 3 / 3.5 (``sd3``): an MMDiT transformer on 16-channel latents
(B, 16, H/8, W/8), unpacked; three text encoders, the T5 one optional (``text_encoder_3``
None: CLIP only, as the pipeline allows)."""

from __future__ import annotations

from magicseg.generate.diffusers.unet import initial_latents


def noise(pipe, seed: int, height: int, width: int, device, dtype):
    """One image's initial latents, 1 x C x H/f x W/f (C = the transformer's input channels)."""
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels
    return initial_latents(seed, (c, height // f, width // f), device, dtype)


def size_multiple(pipe) -> int:
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size
