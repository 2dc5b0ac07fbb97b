"""GPTQ (Frantar et al., 2022) through gptqmodel: uniform bits, calibrated on the grid's calibration set."""

from __future__ import annotations

from dataclasses import dataclass

from qrobust.tasks.methods.base import UniformBitsMethod


@dataclass(frozen=True, kw_only=True)
class GPTQ(UniformBitsMethod):
    name = "gptq"
    plot_style = ("o", "-")
    report_name = "GPTQ"
    needs_calibration = True

    def quantize_config(self, allocation=None):
        from gptqmodel import QuantizeConfig

        return QuantizeConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=False)
