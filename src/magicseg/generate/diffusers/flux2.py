"""FLUX.2 and FLUX.2 [klein] (``flux2``): the pipeline packs the latents itself; its
``latents=`` are unpacked, (B, 4C, H/2f, W/2f) = (B, 128, H/16, W/16) for 32 latent channels
and f = 8. Klein's distilled checkpoints ignore guidance (``is_distilled``): ``guidance: 0``."""

from __future__ import annotations

from magicseg.generate.diffusers.unet import initial_latents


def noise(pipe, seed: int, height: int, width: int, device, dtype):
    """One image's initial latents, 1 x 4C x H/2f x W/2f (4C = the transformer's input)."""
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels
    h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
    return initial_latents(seed, (c, h // 2, w // 2), device, dtype)


def size_multiple(pipe) -> int:
    return 2 * pipe.vae_scale_factor
