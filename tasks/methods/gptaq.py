"""GPTAQ ("GPTQ v2", Li et al., 2025): GPTQ that also corrects the error its own quantized
inputs carry, by calibrating each layer against the full-precision model's activations
(gptqmodel's `GPTAQConfig`). Same checkpoint format and kernels as GPTQ."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.config import ConfigError
from qrobust.tasks.methods.gptq import GPTQ


@dataclass(frozen=True, kw_only=True)
class GPTAQ(GPTQ):
    name = "gptaq"
    plot_style = ("D", "-")
    report_name = "GPTAQ"
    alpha: float = 0.25  # weight of the asymmetric (input-error) term

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"gptaq alpha {self.alpha!r} must be a number in [0, 1]")

    def quantize_config(self, allocation=None):
        from gptqmodel.quantization.config import GPTAQConfig, GPTQConfig

        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=False,
                          gptaq=GPTAQConfig(alpha=self.alpha))
