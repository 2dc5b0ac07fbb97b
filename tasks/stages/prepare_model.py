"""Model preparation stage: the full-precision checkpoint every later stage of a model starts from.

- a tiny model is built here from its config (fixed seed, local tokenizer), and trained when its
  spec says so (`tasks.models.training`: base checkpoint -> trained checkpoint, in one artifact);
- a checkpoint in a diffusion model's own format (the hub's, or a tiny one written in that format)
  is converted once into a standard transformers checkpoint: CoDA to Qwen3 (`tasks.models.coda`),
  Dream to Qwen2 (`tasks.models.dream`), LLaDA to Llama (`tasks.models.llada`); every later stage
  and gptqmodel load that;
- any other hub model is named by its id (`hf_id`) and loaded from the hub where it runs.
"""

from __future__ import annotations

from pathlib import Path

from qrobust.tasks.artifacts import PreparedModel
from qrobust.tasks.config import ConfigError, ModelSpec
from qrobust.tasks.runtime.stage import Stage, StageContext
from qrobust.tasks.runtime.workspace import directory_bytes


def prepare_model(context: StageContext, spec: ModelSpec) -> PreparedModel:
    fields = dict(
        key=context.key, name=spec.name, family=spec.family, dtype=spec.dtype, mask_token_id=spec.mask_token_id,
        logits_shift=spec.logits_shift, trust_remote_code=spec.trust_remote_code, model_bytes=None,
    )
    if spec.training is not None:
        _check_trainable(spec)
    if spec.architecture != "auto":
        return _converted(context.directory, spec, fields)
    if spec.hf_id is not None:
        return PreparedModel(**fields, hf_id=spec.hf_id)
    from qrobust.tasks.models.tiny import save_tiny

    training = None
    if spec.training is None:
        save_tiny(spec.tiny, context.directory)
    else:
        training = _save_trained_tiny(spec, context.directory)
    return _with_local_weights(PreparedModel(**fields, training=training), context.directory)


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
    from qrobust.tasks.models.training import train_in_portable_process

    base = directory / "base"
    save_tiny(spec.tiny, base)
    stats = train_in_portable_process(
        base, spec.family, spec.training, spec.training.max_new_tokens, spec.mask_token_id, directory,
        logits_shift=spec.logits_shift,
    )
    shutil.rmtree(base)
    return stats


def _native_format(architecture: str):
    """(convert, write_tiny, format name) of a native checkpoint format."""
    if architecture == "coda":
        from qrobust.tasks.models.coda import convert_coda_checkpoint, write_tiny_coda_checkpoint

        return convert_coda_checkpoint, write_tiny_coda_checkpoint, "CoDA"
    if architecture == "dream":
        from qrobust.tasks.models.dream import convert_dream_checkpoint, write_tiny_dream_checkpoint

        return convert_dream_checkpoint, write_tiny_dream_checkpoint, "Dream"
    from qrobust.tasks.models.llada import convert_llada_checkpoint, write_tiny_llada_checkpoint

    return convert_llada_checkpoint, write_tiny_llada_checkpoint, "LLaDA"


def _converted(directory: Path, spec: ModelSpec, fields: dict) -> PreparedModel:
    import tempfile

    convert, write_tiny, format_name = _native_format(spec.architecture)
    with tempfile.TemporaryDirectory() as tiny:
        source = spec.hf_id or write_tiny(Path(tiny), spec.tiny)
        name = spec.hf_id or f"tiny {format_name}-format checkpoint, seed {spec.tiny.init_seed}"
        marker = convert(source, directory, spec.dtype, spec.mask_token_id, source_name=name)
    fields = {**fields, "mask_token_id": marker["mask_token_id"]}
    return _with_local_weights(PreparedModel(**fields, conversion=marker), directory)


def _with_local_weights(model: PreparedModel, directory: Path) -> PreparedModel:
    """Its size on disk and in parameters, and the mask token its tokenizer names when the spec gave none."""
    import dataclasses

    from transformers import AutoTokenizer

    mask_token_id = model.mask_token_id
    if model.family == "diffusion" and mask_token_id is None:
        mask_token_id = AutoTokenizer.from_pretrained(directory).mask_token_id
    return dataclasses.replace(model, model_bytes=directory_bytes(directory), mask_token_id=mask_token_id,
                               parameters=saved_parameters(directory))


def saved_parameters(directory: Path) -> int:
    """Values in a checkpoint's safetensors files (each tensor once), read from their headers."""
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            total += sum(math.prod(opened.get_slice(name).get_shape()) for name in opened.keys())
    return total


STAGE = Stage("prepare-model", prepare_model, PreparedModel, libraries=("torch", "transformers", "tokenizers"),
              loads_model=True)
