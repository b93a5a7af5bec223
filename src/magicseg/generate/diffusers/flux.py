"""FLUX.1 (``flux``): a transformer on 2x2-packed latents. The pipeline's ``latents=`` are
packed, (B, (H/2f)(W/2f), 4C) = (B, (H/16)(W/16), 64) for 16 latent channels and f = 8:
:func:`noise` draws the unpacked (1, C, H/f, W/f) tensor the pipeline would draw for that seed
and packs it the pipeline's way. FLUX.1 [schnell] has no guidance of any kind (no guidance
embedding, no classifier-free guidance): ``guidance: 0``; FLUX.1 [dev] embeds the guidance."""

from __future__ import annotations

from magicseg.generate.diffusers.unet import initial_latents


def noise(pipe, seed: int, height: int, width: int, device, dtype):
    """One image's initial latents, packed: 1 x (H/2f)(W/2f) x 4C."""
    f = pipe.vae_scale_factor
    c = pipe.transformer.config.in_channels // 4
    h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
    latents = initial_latents(seed, (c, h, w), device, dtype)
    return pipe._pack_latents(latents, 1, c, h, w)


def size_multiple(pipe) -> int:
    return 2 * pipe.vae_scale_factor
