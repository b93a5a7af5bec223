"""Run a model over items in batches; on out-of-memory halve the batch and retry.

Used by ``run_generate`` and ``run_label``: a batch that does not fit (``torch.cuda.
OutOfMemoryError`` or ``MemoryError``) is split in halves and retried, down to one item; the
smaller size is kept for the rest of the run. Results are yielded per batch, so the caller
saves each as soon as it exists and an error later loses nothing already done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from magicseg.core.errors import BackendError

T = TypeVar("T")
R = TypeVar("R")


def is_oom(err: BaseException) -> bool:
    """True for ``MemoryError`` and torch's ``OutOfMemoryError`` (without importing torch)."""
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or type(err).__name__ == "OutOfMemoryError"


def _free_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def batched_with_oom_retry(
    items: Sequence[T],
    batch_size: int,
    fn: Callable[[Sequence[T]], list[R]],
    what: str = "batch",
    on_shrink: Callable[[int], None] | None = None,
) -> Iterator[tuple[Sequence[T], list[R]]]:
    """Yield ``(batch, fn(batch))`` over ``items`` in order.

    On out-of-memory the failing batch is retried at half the size (``on_shrink(new_size)`` is
    called); at size 1 the error becomes a one-line :class:`BackendError` naming ``what``.
    """
    size = max(1, int(batch_size))
    start = 0
    while start < len(items):
        batch = items[start : start + size]
        try:
            results = fn(batch)
        except Exception as err:  # MemoryError and torch's OutOfMemoryError are Exceptions
            if not is_oom(err):
                raise
            del err  # drop the traceback's references to the batch's tensors
            _free_gpu_memory()
            if size == 1:
                raise BackendError(
                    f"{what}: out of memory on a batch of 1 (first item {_name(batch[0])}); "
                    "lower the image size or use a device with more memory"
                ) from None
            size = max(1, size // 2)
            if on_shrink is not None:
                on_shrink(size)
            continue
        yield batch, results
        start += len(batch)


def _name(item: object) -> str:
    return repr(getattr(item, "id", item))[:80]
