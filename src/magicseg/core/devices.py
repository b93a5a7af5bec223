"""The one device resolution: a params value (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...)
-> a ``torch.device``, or a one-line error naming the params key. torch is imported inside
the function, so importing this module is cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicseg.core.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import torch

SUPPORTED = ("cpu", "cuda", "mps", "xpu")


def resolve_device(name: str | None, key: str) -> torch.device:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; any other name must be a
    torch device of a supported type (:data:`SUPPORTED`). ``key`` (e.g. ``train.device``) is
    named in the errors: ConfigError for a name torch does not know, BackendError for CUDA
    asked for where there is none."""
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{key}: not a torch device {name!r} (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type not in SUPPORTED:
        raise ConfigError(f"{key}: unsupported device type {device.type!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"{key}: {name!r} requested but CUDA is not available here; use cpu or auto"
        )
    return device


def resolve_dtype(name: str, device: torch.device | str, key: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA (float16 where bf16 is missing), float32 elsewhere;
    ``float16`` on a CPU is refused (slow or unsupported kernels), naming ``key``."""
    import torch

    kind = torch.device(device).type
    if name == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and kind == "cpu":
        raise ConfigError(
            f"{key}: float16 is not supported on the CPU; use float32, bfloat16 or auto"
        )
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{key}: unknown dtype {name!r} (use auto, float32, bfloat16, float16)")
    return getattr(torch, name)
