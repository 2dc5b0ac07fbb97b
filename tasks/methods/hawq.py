"""HAWQ-style mixed precision: per-layer bits from Hessian traces under an average-bit budget.

The curvature stages (hessian, then allocation) choose each module's width; quantization is
then GPTQ with gptqmodel's per-module `dynamic` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.config import ConfigError, choice
from qrobust.tasks.methods.base import GPTQ_BITS, GroupwiseMethod
from qrobust.tasks.numerics.curvature import MIN_PROBES

TRACE_ESTIMATORS = ("hutchinson", "fisher", "activation")
TIE_POLICIES = ("none", "qkv", "qkv+gate_up")


@dataclass(frozen=True)
class CurvatureSettings:
    """What the Hessian stage computes: independent of the budget, so every budget shares it."""

    estimator: str
    probes: int
    tolerance: float | None


@dataclass(frozen=True, kw_only=True)
class HAWQ(GroupwiseMethod):
    name = "hawq"
    plot_style = ("^", "--")
    report_name = "HAWQ"
    needs_calibration = True
    needs_curvature = True
    compared_with = "gptq"
    list_setting = ("budgets", "budget")
    budget: float
    estimator: str = "hutchinson"
    tie: str = "qkv"
    probes: int = 16
    trace_tolerance: float | None = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = min(GPTQ_BITS), max(GPTQ_BITS)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not low <= self.budget <= high:
            raise ConfigError(f"hawq budget {self.budget!r} must be an average bit-width between {low} and {high}")
        object.__setattr__(self, "budget", float(self.budget))
        choice(self.estimator, TRACE_ESTIMATORS, "trace estimator")
        choice(self.tie, TIE_POLICIES, "tie policy")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ConfigError(f"hawq probes {self.probes!r} must be a positive integer")
        if self.estimator == "hutchinson" and self.trace_tolerance is not None and self.probes < MIN_PROBES:
            raise ConfigError(f"hawq probes {self.probes} is below {MIN_PROBES}, the fewest that judge "
                              f"trace_tolerance {self.trace_tolerance}; allowed: probes >= {MIN_PROBES}")

    @classmethod
    def missing_list_message(cls) -> str:
        return "method hawq needs budgets = [...] (average bits, e.g. [2.5, 3.5])"

    @property
    def label(self) -> str:
        return f"hawq-{self.budget:g}"

    @property
    def curvature(self) -> CurvatureSettings:
        return CurvatureSettings(self.estimator, self.probes, self.trace_tolerance)

    def quantize_config(self, allocation=None):
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(bits=allocation.default_bits, group_size=self.group_size, sym=self.sym,
                              desc_act=False, dynamic=allocation.dynamic or None)
