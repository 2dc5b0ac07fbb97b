"""Quantization stage: a model quantized by one method through gptqmodel, saved in GPTQ format.

The method (`tasks.methods`) says how gptqmodel is configured (RTN, GPTQ, GPTAQ, or HAWQ's
per-module `dynamic` bits from the allocation stage) and whether it calibrates; this stage
loads, quantizes and saves. Full precision never comes here. Every quantized checkpoint is
saved in the workspace and reloaded from disk for generation, exactly as a user would serve it.
"""

from __future__ import annotations

import time
from pathlib import Path

from qrobust.tasks.artifacts import BitAllocation, CalibrationSet, PreparedModel, QuantizedCheckpoint
from qrobust.tasks.runtime.provenance import environment
from qrobust.tasks.runtime.stage import Stage, StageContext
from qrobust.tasks.runtime.workspace import directory_bytes


def quantized_module_bits(checkpoint: Path) -> dict[str, int]:
    """Bits of every quantized module, read back from a saved checkpoint's tensors.

    A GPTQ `qweight` packs 32 // bits values of each input column into one int32 row, so
    its row count is in_features * bits / 32; `g_idx` gives in_features.
    """
    from safetensors import safe_open

    bits: dict[str, int] = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            names = set(tensors.keys())
            for name in sorted(n for n in names if n.endswith(".qweight")):
                module = name.removesuffix(".qweight")
                in_features = tensors.get_slice(f"{module}.g_idx").get_shape()[0]
                packed_rows = tensors.get_slice(name).get_shape()[0]
                bits[module] = packed_rows * 32 // in_features
    return bits


def average_bits(checkpoint: Path) -> float:
    """Parameter-weighted mean bits over the quantized modules of a checkpoint."""
    from safetensors import safe_open

    module_bits = quantized_module_bits(checkpoint)
    weighted = total = 0
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            for module, bits in module_bits.items():
                if f"{module}.qweight" in tensors.keys():
                    in_features = tensors.get_slice(f"{module}.g_idx").get_shape()[0]
                    out_features = tensors.get_slice(f"{module}.qweight").get_shape()[1]
                    weighted += in_features * out_features * bits
                    total += in_features * out_features
    return weighted / total if total else 0.0


def quantize_model(context: StageContext, prepared: PreparedModel, method, calibration: CalibrationSet | None,
                   allocation: BitAllocation | None) -> QuantizedCheckpoint:
    """Quantize a model with one method (gptqmodel configured by the method) into a GPTQ checkpoint."""
    import contextlib

    from qrobust.tasks.runtime.environment import library_output_to, torch_dtype
    from qrobust.tasks.stages.calibration import gptq_calibration_examples

    workspace = context.workspace
    seconds = {}
    # gptqmodel writes a logs/ folder into the working directory; keep it in the workspace
    with library_output_to(context.log), contextlib.chdir(workspace.logs):
        from gptqmodel import GPTQModel

        method.check_input_widths(input_widths(prepared.location(workspace), prepared.trust_remote_code),
                                  prepared.name)
        started = time.perf_counter()
        model = GPTQModel.load(
            prepared.location(workspace), method.quantize_config(allocation), dtype=torch_dtype(prepared.dtype),
            trust_remote_code=prepared.trust_remote_code,
        )
        if prepared.family == "diffusion":
            from qrobust.tasks.models.diffusion import enable_bidirectional_attention

            # calibration activations must come from the attention the model runs with
            enable_bidirectional_attention(model.model)
        seconds["load"] = time.perf_counter() - started
        examples = gptq_calibration_examples(calibration, workspace) if method.needs_calibration else None
        started = time.perf_counter()
        model.quantize(examples)
        seconds["quantize"] = time.perf_counter() - started  # packing included: gptqmodel packs as it goes
        started = time.perf_counter()
        model.save(str(context.directory))
        seconds["save"] = time.perf_counter() - started
    return QuantizedCheckpoint(
        key=context.key, name=prepared.name, family=prepared.family, dtype=prepared.dtype,
        mask_token_id=prepared.mask_token_id, logits_shift=prepared.logits_shift,
        trust_remote_code=prepared.trust_remote_code, model_bytes=directory_bytes(context.directory),
        method=method.label, weight_bits=average_bits(context.directory),
        layer_bits=quantized_module_bits(context.directory), seconds=seconds,
        allocated_bits=allocation.bits if allocation else None,
        environment=environment(quantization_device(), prepared.dtype),
    )


def input_widths(location: str, trust_remote_code: bool) -> tuple[int, ...]:
    """The input widths of a checkpoint's quantized layers, from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.hidden_size, config.num_attention_heads * head_dim, config.intermediate_size)


def quantization_device() -> str:
    """Where gptqmodel quantizes: the first GPU when there is one."""
    from qrobust.tasks.runtime.environment import default_device

    return default_device()


STAGE = Stage("quantize", quantize_model, QuantizedCheckpoint,
              libraries=("torch", "transformers", "gptqmodel", "safetensors"), loads_model=True)
