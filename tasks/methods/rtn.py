"""Round-to-nearest: group-wise quantization with no calibration, the baseline GPTQ improves on."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.methods.base import GPTQ_BITS, GroupwiseMethod, check_bits


@dataclass(frozen=True, kw_only=True)
class RTN(GroupwiseMethod):
    name = "rtn"
    plot_style = ("s", ":")
    report_name = "RTN"
    list_setting = ("bits", "bits")
    bits: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.name, self.bits)

    @classmethod
    def missing_list_message(cls) -> str:
        return f"method {cls.name} needs bits = [...]; allowed: {', '.join(map(str, GPTQ_BITS))}"

    @property
    def label(self) -> str:
        return f"rtn-w{self.bits}g{self.group_size}"

    def quantize_config(self, allocation=None):
        from gptqmodel.quantization.config import RTNConfig

        return RTNConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)
