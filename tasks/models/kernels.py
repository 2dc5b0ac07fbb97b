"""Which gptqmodel kernel multiplies by a quantized checkpoint's weights.

A grid names a kernel (`[generation] kernel`); `resolve_kernel` turns the name into gptqmodel's
backend for the bits, group size, device and dtype at hand, or refuses it with one line naming
the value and the kernels that can run there. `auto` picks the first kernel gptqmodel itself
would consider that needs no network: Machete (Hopper, 4/8-bit) downloads CUTLASS on first use
unless `GPTQMODEL_CUTLASS_DIR` points at a local copy, so on offline machines `auto` passes it by.
"""

from __future__ import annotations

import functools
import os

from qrobust.tasks.config import KERNEL_NAMES, ConfigError

# grid name -> gptqmodel backend (GPTQ format), in the order of KERNEL_NAMES
KERNELS = dict(zip(KERNEL_NAMES, (
    "auto", "gptq_marlin", "gptq_machete", "gptq_exllama_v2", "gptq_triton", "gptq_bitblas", "gptq_torch",
    "gptq_torch_aten", "gptq_torch_fused",
), strict=True))
# kernels that fetch code from the network the first time they run, and what lets them not
NEEDS_NETWORK = {"gptq_machete": "GPTQMODEL_CUTLASS_DIR"}


def resolve_kernel_for_widths(name: str, bit_widths, group_size: int, sym: bool, device: str, dtype: str) -> str:
    """The one backend for a checkpoint holding every width in `bit_widths` (HAWQ mixes them)."""
    widths = sorted(set(bit_widths))
    backends = [resolve_kernel(name, bits, group_size, sym, device, dtype) for bits in widths]
    if name != "auto" or len(set(backends)) == 1:
        return backends[0]
    common = [k for k in runnable_kernels(widths[0], group_size, sym, device, dtype)
              if all(k in runnable_kernels(b, group_size, sym, device, dtype) for b in widths[1:])]
    if not common:
        raise ConfigError(f"no gptqmodel kernel runs all of {widths} bits at group size {group_size} on {device}")
    return KERNELS[common[0]]


def resolve_kernel(name: str, bits: int, group_size: int, sym: bool, device: str, dtype: str) -> str:
    """gptqmodel's backend for kernel `name` on `device`; ConfigError naming what is allowed if it cannot run."""
    if name not in KERNELS:
        raise ConfigError(f"unknown kernel {name!r}; allowed: {', '.join(KERNELS)}")
    runnable = runnable_kernels(bits, group_size, sym, device, dtype)
    if name == "auto":
        if not runnable:
            raise ConfigError(f"no gptqmodel kernel runs {bits}-bit weights at group size {group_size} on {device}")
        return KERNELS[runnable[0]]
    if name not in runnable:
        allowed = ", ".join(runnable) or "none"
        reason = _why_not(KERNELS[name], bits, group_size, sym, device, dtype)
        raise ConfigError(f"kernel {name!r} cannot run {bits}-bit weights at group size {group_size} on {device} "
                          f"({reason}); allowed there: {allowed}")
    return KERNELS[name]


@functools.lru_cache(maxsize=None)
def runnable_kernels(bits: int, group_size: int, sym: bool, device: str, dtype: str) -> list[str]:
    """The grid names of the kernels that can run here, gptqmodel's preference first."""
    candidates = _select(bits, group_size, sym, device, dtype, "auto", every_candidate=True)
    backends = {backend: name for name, backend in KERNELS.items() if name != "auto"}
    names = []
    for kernel in candidates:
        backend = _backend_of(kernel)
        if backend in backends and _works_offline(backend) and backends[backend] not in names:
            names.append(backends[backend])
    return names


def _works_offline(backend: str) -> bool:
    variable = NEEDS_NETWORK.get(backend)
    return variable is None or bool(os.environ.get(variable))


def _why_not(backend: str, bits: int, group_size: int, sym: bool, device: str, dtype: str) -> str:
    if backend in NEEDS_NETWORK and not _works_offline(backend):
        return f"it downloads code at first use; set {NEEDS_NETWORK[backend]} to a local copy"
    try:
        _select(bits, group_size, sym, device, dtype, backend, every_candidate=False)
    except Exception as exc:  # gptqmodel says why in its own words, with its own exception types
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    return "not available here"


def _backend_of(kernel) -> str | None:
    """The GPTQ backend name gptqmodel gives a kernel class."""
    return _gptq_backends_by_kernel().get(kernel)


@functools.lru_cache(maxsize=1)
def _gptq_backends_by_kernel() -> dict:
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.importer import AUTO_BACKEND_KERNEL_MAPPING

    return {kernel: backend.value for backend, kernel in AUTO_BACKEND_KERNEL_MAPPING[METHOD.GPTQ][FORMAT.GPTQ].items()}


def _select(bits: int, group_size: int, sym: bool, device: str, dtype: str, backend: str, every_candidate: bool):
    import torch
    from gptqmodel.models._const import DEVICE
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    from qrobust.tasks.runtime.environment import torch_dtype

    selected = select_quant_linear(
        bits=bits, group_size=group_size, desc_act=False, sym=sym,
        device=DEVICE.CUDA if device.startswith("cuda") else DEVICE.CPU, backend=BACKEND(backend),
        format=FORMAT.GPTQ, quant_method=METHOD.GPTQ, pack=False, pack_dtype=torch.int32, dtype=torch_dtype(dtype),
        multi_select=every_candidate,
    )
    return selected if every_candidate else [selected]


def quantized_layer_classes(model) -> tuple[str, ...]:
    """The gptqmodel kernel classes a loaded model's layers run on, sorted."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return tuple(sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)}))
