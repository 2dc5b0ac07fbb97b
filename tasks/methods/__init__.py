"""The quantization methods a grid can name, each declared once.

A method is a frozen dataclass (its settings, validated when built) whose class says what it
needs (calibration data, HAWQ's curvature stages), how it is labelled and reported, and how
gptqmodel is configured for it. The flow asks a method what it needs and names none; the grid
parser asks this registry which class a `[[methods]] name` is.

Adding a method: a module with its class, one line in `REGISTRY`, and its tests.
"""

from __future__ import annotations

import importlib

from qrobust.tasks.config import ConfigError

# name in a grid -> "module:class", imported only when a grid names it
REGISTRY = {
    "fp": "qrobust.tasks.methods.fp:FullPrecision",
    "rtn": "qrobust.tasks.methods.rtn:RTN",
    "gptq": "qrobust.tasks.methods.gptq:GPTQ",
    "gptaq": "qrobust.tasks.methods.gptaq:GPTAQ",
    "hawq": "qrobust.tasks.methods.hawq:HAWQ",
}


# The method every quantized cell is compared with (the store's statistics views and the report).
BASELINE = "fp"


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def mixed_precision_methods() -> tuple[str, ...]:
    """Methods that choose bits per layer (HAWQ-style): the report draws their allocations."""
    return tuple(name for name in REGISTRY if method_class(name).needs_curvature)


def plot_style(name: str) -> tuple[str, str]:
    """(marker, line style) of a method's curves; a method no longer registered gets a plain one."""
    return method_class(name).plot_style if name in REGISTRY else ("x", "-.")


def method_class(name: str):
    """The class registered as `name`; ConfigError naming the allowed ones if there is none."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(REGISTRY)}")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def parse_method_entry(raw) -> list:
    """The methods one `[[methods]]` table declares (a list of bits or budgets gives several)."""
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"a method entry needs a name, got {raw!r}")
    return method_class(raw["name"]).from_grid({k: v for k, v in raw.items() if k != "name"})
