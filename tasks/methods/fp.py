"""Full precision: the baseline every quantized cell is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.config import ConfigError
from qrobust.tasks.methods.base import Method


@dataclass(frozen=True, kw_only=True)
class FullPrecision(Method):
    name = "fp"
    report_name = "full precision"
    quantizes = False

    @classmethod
    def from_grid(cls, raw: dict) -> list[Method]:
        if raw:
            raise ConfigError(f"method fp takes no settings, got {', '.join(sorted(raw))} (no bits or budgets)")
        return [cls()]
