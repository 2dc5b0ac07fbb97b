"""The accuracy path: a quantized checkpoint as plain linear layers holding its dequantized weights.

What a quantized model answers depends only on its weight values, not on the kernel that
multiplies by them, so accuracy can be measured with those values in ordinary `nn.Linear`
layers, at full-precision speed, whatever the bit-width (gptqmodel's kernels are fast for some
bit-widths and devices and slow for others). Latency and memory are measured on the kernel
path (`qrobust.tasks.models.loading.load_model(..., weights="kernel")`).

The weights are gptqmodel's own dequantization, `scale * (q - zero)` per group, computed in the
checkpoint's run dtype by its reference torch kernel (`BACKEND.GPTQ_TORCH`): bit for bit the
weights that kernel multiplies by. Other kernels (the CPU's int4 aten kernel, Marlin on CUDA)
multiply by the same values with their own internal rounding and accumulation order, so their
outputs agree with this path to within rounding, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path


def dequantized_model(location: Path, dtype: str, device: str | None = None):
    """The quantized checkpoint at `location` with every quantized layer replaced by an
    `nn.Linear` holding its dequantized weights (in `dtype`, on `device`); in eval mode."""
    from qrobust.tasks.runtime.environment import default_device, library_output_to, torch_dtype

    location = Path(location)
    if not (location / "quantize_config.json").exists():
        raise ValueError(f"checkpoint {str(location)!r} is not quantized; only quantized checkpoints dequantize")
    with library_output_to(location.parent / f"{location.name}.load.log"):
        from gptqmodel import BACKEND, GPTQModel

        wrapped = GPTQModel.load(
            str(location), device=device or default_device(), dtype=torch_dtype(dtype), backend=BACKEND.GPTQ_TORCH,
        )
    model = wrapped.model
    if replace_quantized_linears(model) == 0:
        raise ValueError(f"checkpoint {str(location)!r} has no quantized layers to dequantize")
    return model.eval()


def replace_quantized_linears(model) -> int:
    """Swap every gptqmodel quantized linear layer of `model` for an `nn.Linear` with its
    dequantized weight and bias; returns how many were swapped."""
    import torch
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseQuantLinear)]
    with torch.no_grad():
        for name, module in quantized:
            weight = module.dequantize_weight()  # [in_features, out_features]
            linear = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None,
                device=weight.device, dtype=weight.dtype,
            )
            linear.weight.copy_(weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
    if quantized and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # nothing in the model is quantized any more
    return len(quantized)
