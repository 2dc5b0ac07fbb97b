"""Round-to-nearest: group-wise quantization with no calibration, the baseline GPTQ improves on."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.methods.base import UniformBitsMethod


@dataclass(frozen=True, kw_only=True)
class RTN(UniformBitsMethod):
    name = "rtn"
    plot_style = ("s", ":")
    report_name = "RTN"

    def quantize_config(self, allocation=None):
        from gptqmodel.quantization.config import RTNConfig

        return RTNConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)
