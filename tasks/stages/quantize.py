"""Quantization stage: fp (no change), group-wise RTN and GPTQ through gptqmodel.

HAWQ is GPTQ with a per-module bit map (gptqmodel's `dynamic`) computed by the allocation
stage. Every quantized checkpoint is saved in GPTQ format in the workspace and reloaded
from disk for generation, exactly as a user would serve it.
"""

from __future__ import annotations

import time
from pathlib import Path

from qrobust.tasks.config import MethodSpec, config_hash
from qrobust.tasks.runtime.workspace import Workspace, directory_bytes, read_manifest, write_manifest

FULL_PRECISION_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def quantize_config(method: MethodSpec, allocation: dict | None = None):
    """The gptqmodel config for a method (RTN needs no calibration data).

    For HAWQ, `allocation` holds the allocated `default_bits` and the `dynamic` overrides
    of every module allocated a different width.
    """
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import RTNConfig

    if method.name == "rtn":
        return RTNConfig(bits=method.bits, group_size=method.group_size, sym=method.sym)
    if method.name == "gptq":
        bits, dynamic = method.bits, None
    else:
        bits, dynamic = allocation["default_bits"], allocation["dynamic"] or None
    return QuantizeConfig(bits=bits, group_size=method.group_size, sym=method.sym, desc_act=False, dynamic=dynamic)


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


def quantize_model(
    model_manifest: dict,
    method: MethodSpec,
    calibration_manifest: dict | None,
    workspace: Workspace,
    allocation: dict | None = None,
) -> dict:
    """Quantize a model with one method; returns the checkpoint's manifest."""
    if not method.quantizes:
        bits = FULL_PRECISION_BITS.get(model_manifest["dtype"], 16)
        return {**model_manifest, "method": method.label, "avg_bits": float(bits), "quantize_seconds": 0.0}
    key = config_hash(
        {"model": model_manifest["key"], "method": method, "calibration": (calibration_manifest or {}).get("key"),
         "allocation": allocation and allocation["bits"]}
    )
    directory = workspace.artifact_dir("quantized", key)
    if not (directory / "manifest.json").exists():
        _quantize_into(model_manifest, method, calibration_manifest, workspace, key, allocation)
    return read_manifest(directory)


def _quantize_into(model_manifest, method, calibration_manifest, workspace, key, allocation) -> None:
    import contextlib

    from qrobust.tasks.stages.calibration import gptq_calibration_examples
    from qrobust.tasks.models.loading import checkpoint_location, library_output_to, torch_dtype

    directory = workspace.artifact_dir("quantized", key)
    log = workspace.logs / f"quantize-{key}.log"
    # gptqmodel writes a logs/ folder into the working directory; keep it in the workspace
    with workspace.new_artifact("quantized", key) as scratch, library_output_to(log), \
            contextlib.chdir(workspace.logs):
        from gptqmodel import GPTQModel

        started = time.perf_counter()
        model = GPTQModel.load(
            checkpoint_location(model_manifest),
            quantize_config(method, allocation),
            dtype=torch_dtype(model_manifest["dtype"]),
            trust_remote_code=model_manifest.get("trust_remote_code", False),
        )
        if model_manifest["family"] == "diffusion":
            from qrobust.tasks.models.diffusion import enable_bidirectional_attention

            # calibration activations must come from the attention the model runs with
            enable_bidirectional_attention(model.model)
        examples = None if method.name == "rtn" else gptq_calibration_examples(calibration_manifest)
        model.quantize(examples)
        model.save(str(scratch))
        seconds = time.perf_counter() - started
        write_manifest(
            scratch,
            {
                **model_manifest,
                "path": str(directory),
                "hf_id": None,
                "quantized": True,
                "method": method.label,
                "key": key,
                "avg_bits": average_bits(scratch),
                "model_bytes": directory_bytes(scratch),
                "module_bits": quantized_module_bits(scratch),
                "quantize_seconds": seconds,
                "allocated_bits": allocation["bits"] if allocation else None,
            },
        )
