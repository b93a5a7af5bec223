"""UNet families (``sd``: SD 1.x/2.x and SD-Turbo; ``sdxl``: SDXL and SDXL-Turbo): latents
(B, C, H/f, W/f) with C the UNet's input channels (4) and f the VAE factor (8)."""

from __future__ import annotations


def initial_latents(seed: int, shape: tuple[int, ...], device, dtype):
    """1xCxhxw standard-normal latents from a CPU generator seeded with ``seed``.

    The same call the pipeline makes for ``generator=torch.Generator("cpu").manual_seed(seed)``
    and batch 1, so the naive per-image loop and the batched path start from identical noise.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor((1, *shape), generator=gen, device=device, dtype=dtype)


def noise(pipe, seed: int, height: int, width: int, device, dtype):
    """One image's initial latents, 1 x C x H/f x W/f."""
    f = pipe.vae_scale_factor
    return initial_latents(
        seed, (pipe.unet.config.in_channels, height // f, width // f), device, dtype
    )


def size_multiple(pipe) -> int:
    return pipe.vae_scale_factor
