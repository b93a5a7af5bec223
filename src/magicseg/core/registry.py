"""Name -> builder registries for backends.

Builders import their heavy libraries inside the function, so ``import magicseg`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from magicseg.core.errors import BackendError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small registry: ``@reg.register("name")`` on a builder, ``reg.build("name", ...)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def build(self, name: str, *args, **kwargs) -> T:
        if name not in self._builders:
            raise BackendError(
                f"unknown {self.kind} {name!r} (available: {', '.join(self.names())})"
            )
        return self._builders[name](*args, **kwargs)
