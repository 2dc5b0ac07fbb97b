"""What every quantization method declares, and the grid-table parsing they share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from qrobust.tasks.config import ConfigError, build_config

GPTQ_BITS = (2, 3, 4, 8)  # the widths gptqmodel packs and serves


@dataclass(frozen=True, kw_only=True)
class Method:
    """A column of the grid. Subclasses set the class attributes and add their settings as fields.

    - `name`: how a grid names it; `report_name`: how the report shows it.
    - `needs_calibration`: GPTQ-style methods quantize with calibration activations.
    - `needs_curvature`: HAWQ-style methods get Hessian traces and a bit allocation first.
    - `quantizes`: False for the full-precision baseline, which skips quantization.
    - `list_setting`: a grid key that takes a list and expands into one method per value
      (`bits = [2, 4]`), with the field each value fills.
    - `plot_style`: (marker, line style) of its curves in the report.
    - `compared_with`: for a mixed-precision method, the uniform method the report sets it beside.
    """

    name: ClassVar[str]
    report_name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    needs_curvature: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True
    list_setting: ClassVar[tuple[str, str] | None] = None
    plot_style: ClassVar[tuple[str, str]] = ("x", "-.")
    compared_with: ClassVar[str | None] = None

    @property
    def columns(self) -> dict[str, Any]:
        """The store's method columns: bits (uniform width), budget (average bits) and group size."""
        return {name: getattr(self, name, None) for name in ("bits", "budget", "group_size")}

    @property
    def label(self) -> str:
        return self.name

    @property
    def code_modules(self) -> tuple[str, ...]:
        """Whose source decides what quantization does with this method (part of its cache key)."""
        return tuple(cls.__module__ for cls in type(self).__mro__ if cls.__module__.startswith("qrobust."))

    def quantize_config(self, allocation=None):
        """gptqmodel's configuration for this method (`allocation`: HAWQ's per-module bits)."""
        raise NotImplementedError(f"method {self.name} does not quantize")

    def check_input_widths(self, widths: tuple[int, ...], model: str) -> None:
        """Refuse, with one line, settings that cannot quantize layers with these input widths."""

    @classmethod
    def from_grid(cls, raw: dict[str, Any]) -> list["Method"]:
        what = f"method {cls.name}"
        if cls.list_setting is None:
            return [build_config(cls, raw, what)]
        key, field = cls.list_setting
        if key not in raw:
            raise ConfigError(cls.missing_list_message())
        values = raw[key] if isinstance(raw[key], list) else [raw[key]]
        rest = {k: v for k, v in raw.items() if k != key}
        if field in rest:
            raise ConfigError(f"{what} takes {key} = [...], not {field}")
        return [build_config(cls, {**rest, field: value}, what) for value in values]

    @classmethod
    def missing_list_message(cls) -> str:
        key, _ = cls.list_setting
        return f"method {cls.name} needs {key} = [...]"

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The keys a grid table of this method may hold."""
        names = [f.name for f in dataclasses.fields(cls)]
        if cls.list_setting:
            key, field = cls.list_setting
            names = [key if name == field else name for name in names]
        return tuple(names)


@dataclass(frozen=True, kw_only=True)
class GroupwiseMethod(Method):
    """A method that stores weights group-wise at some width in gptqmodel's GPTQ format."""

    group_size: int = 32
    sym: bool = True

    def __post_init__(self) -> None:
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or (size != -1 and size < 1):
            raise ConfigError(f"group_size {size!r} must be a positive integer or -1 (per row)")

    def check_input_widths(self, widths: tuple[int, ...], model: str) -> None:
        """Groups run along a layer's inputs: every input width must be a multiple of the group size."""
        bad = sorted({width for width in widths if self.group_size != -1 and width % self.group_size})
        if not bad:
            return
        common = math.gcd(*widths)
        examples = [d for d in (32, 64, 128, 256) if common % d == 0]
        raise ConfigError(
            f"group_size {self.group_size} does not divide the layer input width {bad[0]} of model {model!r}; "
            f"allowed: -1 (per row) or a divisor of {', '.join(map(str, sorted(set(widths))))}"
            + (f" (e.g. {', '.join(map(str, examples))})" if examples else "")
        )


def check_bits(method: str, bits: Any) -> None:
    if bits not in GPTQ_BITS or isinstance(bits, bool):
        raise ConfigError(f"bits {bits!r} not allowed for {method}; allowed: {', '.join(map(str, GPTQ_BITS))}")


@dataclass(frozen=True, kw_only=True)
class UniformBitsMethod(GroupwiseMethod):
    """Every quantized layer at the same width: a grid lists the widths, one method each."""

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
