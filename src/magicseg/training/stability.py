"""Stability levers of the training loop (``train.precision``, ``train.deterministic``,
``train.ema``): what makes a trained model the same on another machine and less dependent on
the last few steps."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``: ``bf16`` -> bfloat16, ``fp32``
    -> None (no autocast), ``auto`` -> bfloat16 on CUDA, None elsewhere (CPU bf16 kernels
    differ between instruction sets: AVX-512 BF16 / AMX against emulation)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def set_deterministic(enabled: bool) -> None:
    """``torch.use_deterministic_algorithms(enabled)``; on CUDA the cuBLAS workspace setting
    that deterministic matrix products need (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, kept where
    the environment sets it)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


class Ema:
    """An exponential moving average of a model's trained parameters and floating-point
    buffers (BatchNorm statistics): ``shadow = d * shadow + (1 - d) * current`` after every
    step, with the warm-up decay ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` so that
    a short run is not dominated by the initial weights. Kept in fp32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: must be in (0, 1) (got {decay})")
        self.decay = decay
        self.updates = 0
        saved = set(model.state_dict())  # not the non-persistent buffers (constants)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad] + [
            n for n, b in model.named_buffers() if b.is_floating_point() and n in saved
        ]
        self.shadow = {name: t.detach().float().clone() for name, t in self._tensors(model)}

    def _tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for name in self.names:
            yield name, tensors[name]

    def current_decay(self) -> float:
        """The decay of the next update."""
        t = self.updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights."""
        d = self.current_decay()
        for name, t in self._tensors(model):
            self.shadow[name].lerp_(t.detach().float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights restored
        after (validation, saving)."""
        backup = {}
        with torch.no_grad():
            for name, t in self._tensors(model):
                backup[name] = t.detach().clone()
                t.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in self._tensors(model):
                    t.copy_(backup[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": {k: v.cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the model's trained tensors")
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


@contextlib.contextmanager
def maybe_applied(ema: Ema | None, model: nn.Module) -> Iterator[nn.Module]:
    """:meth:`Ema.applied` where there is an average, the model as it is otherwise."""
    if ema is None:
        yield model
    else:
        with ema.applied(model):
            yield model
