"""What every pre-flight check returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Check:
    """One pre-flight result: ``key`` is the params key (or ``disk``), ``message`` what was
    found or what to do; ``machine`` marks a fact of this machine (free disk, devices)."""

    status: Status
    key: str
    message: str
    machine: bool = False

    def line(self) -> str:
        return f"{self.status:<7} {self.key}: {self.message}"
