"""GPTQ (Frantar et al., 2022) through gptqmodel: uniform bits, calibrated on the grid's calibration set."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.methods.base import GPTQ_BITS, GroupwiseMethod, check_bits


@dataclass(frozen=True, kw_only=True)
class GPTQ(GroupwiseMethod):
    name = "gptq"
    plot_style = ("o", "-")
    report_name = "GPTQ"
    needs_calibration = True
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
        return f"{self.name}-w{self.bits}g{self.group_size}"

    def quantize_config(self, allocation=None):
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=False)
