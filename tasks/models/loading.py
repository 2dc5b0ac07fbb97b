"""Loading checkpoints (and their tokenizers) to run them.

A checkpoint artifact (`tasks.artifacts.Checkpoint`) says where its weights are (a workspace
directory, or a hub id resolved on the user's machine) and how the model is run (family, mask
token, logit shift, dtype). Quantized checkpoints are reloaded through gptqmodel; a diffusion
model's bidirectional attention is restored by the way it is called (a 4-D mask, see
`tasks.models.diffusion`), never by a flag that a reload could reset.
"""

from __future__ import annotations

import functools
from pathlib import Path

from qrobust.tasks.config import WEIGHT_MODES
from qrobust.tasks.runtime.environment import default_device, library_output_to, set_library_environment, torch_dtype


def load_tokenizer(checkpoint, workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.location(workspace),
                                              trust_remote_code=checkpoint.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=1)
def _load_cached(location: str, quantized: bool, dtype: str, device: str, trust_remote_code: bool, weights: str,
                 backend: str | None):
    set_library_environment()
    if quantized and weights == "dequantized":
        from qrobust.tasks.models.dequantize import dequantized_model

        return dequantized_model(Path(location), dtype, device)
    if quantized:
        with library_output_to(Path(location).parent / f"{Path(location).name}.load.log"):
            from gptqmodel import BACKEND, GPTQModel

            wrapped = GPTQModel.load(location, device=device, dtype=torch_dtype(dtype), backend=BACKEND(backend))
        model = wrapped.model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(device)
    return model.eval()


def load_model(checkpoint, workspace, device: str | None = None, weights: str = "kernel", kernel: str = "auto"):
    """The model of a checkpoint artifact, on `device` (default: CUDA when present).

    A quantized checkpoint runs on gptqmodel's kernels (`weights="kernel"`, the speed path; `kernel`
    names which, see `tasks.models.kernels`) or as plain linear layers holding its dequantized
    weights (`"dequantized"`, the accuracy path: the same values, at full-precision speed; see
    `tasks.models.dequantize`).
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; allowed: {', '.join(WEIGHT_MODES)}")
    location = checkpoint.location(workspace)
    if location == str(checkpoint.directory(workspace)) and not Path(location, "config.json").exists():
        raise FileNotFoundError(f"checkpoint {location!r} is missing from the workspace")
    device = device or default_device()
    backend = None
    if checkpoint.quantized and weights == "kernel":
        with library_output_to(Path(location).parent / f"{Path(location).name}.load.log"):
            backend = checkpoint_kernel(checkpoint, workspace, kernel, device)
    return _load_cached(location, checkpoint.quantized, checkpoint.dtype, device, checkpoint.trust_remote_code,
                        weights, backend)


def checkpoint_kernel(checkpoint, workspace, kernel: str, device: str) -> str:
    """gptqmodel's backend for a quantized checkpoint's widths and group size on `device`."""
    import json

    from qrobust.tasks.models.kernels import resolve_kernel_for_widths

    config = json.loads((checkpoint.directory(workspace) / "quantize_config.json").read_text())
    widths = set(checkpoint.module_bits.values()) or {config["bits"]}
    return resolve_kernel_for_widths(kernel, widths, config["group_size"], config.get("sym", True), device,
                                     checkpoint.dtype)


def kernel_names(model) -> tuple[str, ...]:
    """The classes of the quantized layers a loaded model multiplies with (empty when none)."""
    from qrobust.tasks.models.kernels import quantized_layer_classes

    return quantized_layer_classes(model)


def model_parameter_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers (quantized ones count packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
