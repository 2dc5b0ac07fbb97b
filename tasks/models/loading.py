"""Preparing a model's base checkpoint and loading checkpoints for generation.

A model manifest names where the weights are (a workspace directory, or a Hugging Face id
that is resolved on the user's machine) and how the model is run (family, mask token,
logit shift). Quantized checkpoints are reloaded through gptqmodel; a diffusion model's
bidirectional attention is restored by the way it is called (a 4-D mask), never by a flag
that a reload could reset.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from qrobust.tasks.config import ConfigError, ModelSpec, config_hash
from qrobust.tasks.runtime.workspace import Workspace, artifact_exists, directory_bytes, read_manifest, write_manifest

QUIET_ENV = {
    "GPTQMODEL_CPU_WORKERS": "2",
    "GPTQMODEL_DISABLE_PACK_EXT": "1",
    "TORCHDYNAMO_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def set_library_environment() -> None:
    """Environment gptqmodel and transformers need on a small CPU machine; user values win."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def library_output_to(log_path: Path):
    """Send everything third-party libraries print (at the fd level) to a log file."""
    import sys

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def model_key(spec: ModelSpec) -> str:
    return f"{spec.name}-{config_hash(spec)}"


def prepare_model(spec: ModelSpec, workspace: Workspace) -> dict:
    """The base (full-precision) checkpoint of a model, built locally for tiny models."""
    manifest = {
        "name": spec.name,
        "family": spec.family,
        "mask_token_id": spec.mask_token_id,
        "logits_shift": spec.logits_shift,
        "dtype": spec.dtype,
        "trust_remote_code": spec.trust_remote_code,
        "quantized": False,
        "key": model_key(spec),
    }
    if spec.training is not None:
        _check_trainable(spec)
    if spec.architecture == "coda":
        return _prepare_coda(spec, workspace, manifest)
    if spec.hf_id is not None:
        return {**manifest, "hf_id": spec.hf_id, "path": None}
    directory = workspace.artifact_dir("models", manifest["key"])
    if not (directory / "manifest.json").exists():
        from qrobust.tasks.models.tiny import save_tiny

        with workspace.new_artifact("models", manifest["key"]) as scratch:
            if spec.training is None:
                save_tiny(spec.tiny, scratch)
            else:
                manifest["training"] = _save_trained_tiny(spec, scratch)
            write_manifest(scratch, _with_tokens(manifest, scratch))
    return read_manifest(directory) | {"path": str(directory)}


def _check_trainable(spec: ModelSpec) -> None:
    """Training builds on the tiny Qwen3 builder and the completion-style prompts only."""
    if spec.tiny is None or spec.architecture != "auto" or spec.prompt_style != "completion":
        raise ConfigError(
            f"model {spec.name!r}: training applies only to tiny models with architecture 'auto' and prompt_style 'completion'"
        )


def _save_trained_tiny(spec: ModelSpec, directory: Path) -> dict:
    """Build the base checkpoint inside `directory`, train it into `directory`, drop the base."""
    import shutil

    from qrobust.tasks.models.tiny import save_tiny
    from qrobust.tasks.models.training import train_tiny_model, training_problems

    base = directory / "base"
    save_tiny(spec.tiny, base)
    stats = train_tiny_model(
        base, spec.family, spec.training, training_problems(spec.training), spec.training.max_new_tokens,
        spec.mask_token_id, directory, logits_shift=spec.logits_shift,
    )
    shutil.rmtree(base)
    return stats


def _prepare_coda(spec: ModelSpec, workspace: Workspace, manifest: dict) -> dict:
    """A CoDA checkpoint (the hub's, or a tiny one written in CoDA's format) converted once into
    a Qwen3 checkpoint in the workspace, which every later stage loads (qrobust.tasks.models.coda)."""
    directory = workspace.artifact_dir("models", manifest["key"])
    if not (directory / "manifest.json").exists():
        import tempfile

        from qrobust.tasks.models.coda import convert_coda_checkpoint, write_tiny_coda_checkpoint

        with workspace.new_artifact("models", manifest["key"]) as scratch, tempfile.TemporaryDirectory() as tiny:
            source = spec.hf_id or write_tiny_coda_checkpoint(Path(tiny), spec.tiny)
            name = spec.hf_id or f"tiny CoDA-format checkpoint, seed {spec.tiny.init_seed}"
            marker = convert_coda_checkpoint(source, scratch, spec.dtype, spec.mask_token_id, source_name=name)
            converted = {**manifest, "mask_token_id": marker["mask_token_id"], "qrobust": marker}
            write_manifest(scratch, _with_tokens(converted, scratch))
    return read_manifest(directory) | {"path": str(directory)}


def _with_tokens(manifest: dict, directory: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    manifest = dict(manifest, path=str(directory), model_bytes=directory_bytes(directory))
    if manifest["family"] == "diffusion" and manifest["mask_token_id"] is None:
        manifest["mask_token_id"] = tokenizer.mask_token_id
    return manifest


def checkpoint_location(manifest: dict) -> str:
    return manifest["path"] or manifest["hf_id"]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(manifest: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint_location(manifest), trust_remote_code=manifest.get("trust_remote_code", False)
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=1)
def _load_cached(location: str, quantized: bool, dtype: str, device: str, trust_remote_code: bool, weights: str):
    set_library_environment()
    if quantized and weights == "dequantized":
        from qrobust.tasks.models.dequantize import dequantized_model

        return dequantized_model({"path": location, "quantized": True, "dtype": dtype}, device)
    if quantized:
        with library_output_to(Path(location).parent / f"{Path(location).name}.load.log"):
            from gptqmodel import GPTQModel

            wrapped = GPTQModel.load(location, device=device, dtype=torch_dtype(dtype))
        model = wrapped.model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(device)
    return model.eval()


def load_model(manifest: dict, device: str | None = None, weights: str = "kernel"):
    """The model a manifest points to, on `device` (default: CUDA when present).

    A quantized checkpoint runs on gptqmodel's kernels (`weights="kernel"`, the speed path) or
    as plain linear layers holding its dequantized weights (`"dequantized"`, the accuracy path:
    the same values, at full-precision speed; see qrobust.tasks.models.dequantize).
    """
    from qrobust.tasks.config import WEIGHT_MODES

    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; allowed: {', '.join(WEIGHT_MODES)}")
    if not manifest.get("hf_id") and not artifact_exists(manifest):
        raise FileNotFoundError(f"checkpoint {manifest.get('path')!r} is missing from the workspace")
    device = device or default_device()
    return _load_cached(
        checkpoint_location(manifest),
        bool(manifest.get("quantized")),
        manifest.get("dtype", "float32"),
        device,
        bool(manifest.get("trust_remote_code")),
        weights,
    )


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_parameter_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers (quantized ones count packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
