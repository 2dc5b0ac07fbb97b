"""Calibration data: N sequences of seq_len tokens for GPTQ and the Hessian stage.

Sources: `stdlib` (the Python standard library's own source files: a code corpus every
machine has, and never a benchmark's test problems), `training-set` (the very sequences a
model trained by the pipeline learned: the only in-distribution data of the tiny demo
models, whose loss on anything else is far from a minimum, so that their Hessian traces
there are indefinite and useless for HAWQ) or any Hugging Face dataset name (on a machine
with hub access). A diffusion model sees partly masked inputs at inference,
so its calibration inputs are masked at varied ratios (`mask_ratios`, cycled over samples);
the clean tokens are kept beside them for the denoising loss.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from qrobust.tasks.artifacts import CalibrationSet, PreparedModel
from qrobust.tasks.config import CalibrationSpec, ConfigError
from qrobust.tasks.runtime.stage import Stage, StageContext

LOCAL_SOURCES = ("stdlib", "training-set")
TENSORS = "calibration.safetensors"


def stdlib_texts(limit_chars: int) -> list[str]:
    """Source files of the standard library in a fixed order, up to `limit_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="ignore")
        if len(text) < 2000:
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return texts


def training_set_texts(model: PreparedModel) -> list[str]:
    """Prompt + answer of every problem a pipeline-trained model memorised."""
    from qrobust.tasks.benchmarks import benchmark_format, load_problems, render_prompt
    from qrobust.tasks.config import BenchmarkSpec
    from qrobust.tasks.models.training import BUNDLED_MBPP, completion_text

    if not model.training:
        raise ConfigError(
            f"calibration source 'training-set' needs a model trained by the pipeline; {model.name!r} is not"
        )
    wanted = set(model.training["task_ids"])
    problems = load_problems(BenchmarkSpec("humaneval")) + load_problems(BenchmarkSpec("mbpp", path=BUNDLED_MBPP))
    return [
        render_prompt(p, benchmark_format(p.benchmark, "completion")) + completion_text(p)
        for p in problems
        if p.task_id in wanted
    ]


def calibration_texts(spec: CalibrationSpec, model: PreparedModel) -> list[str]:
    if spec.source == "stdlib":
        return stdlib_texts(spec.n_samples * spec.seq_len * 8)
    if spec.source == "training-set":
        return training_set_texts(model)
    return hub_texts(spec)


def hub_texts(spec: CalibrationSpec) -> list[str]:
    try:
        from datasets import load_dataset

        rows = load_dataset(spec.source, split=spec.dataset_split, streaming=True)
        return [row[spec.dataset_text_field] for _, row in zip(range(spec.n_samples * 4), rows)]
    except Exception as exc:
        raise ConfigError(
            f"calibration source {spec.source!r} could not be loaded ({type(exc).__name__}); "
            f"use one of {', '.join(LOCAL_SOURCES)} or a reachable dataset"
        ) from None


def calibration_token_windows(spec: CalibrationSpec, tokenizer, texts: list[str]):
    """`n_samples` windows of `seq_len` tokens drawn at seeded offsets from the corpus."""
    import torch

    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long)
    if ids.numel() < spec.seq_len + 1:
        raise ConfigError(f"calibration source {spec.source!r} has only {ids.numel()} tokens; need {spec.seq_len}")
    generator = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.n_samples,), generator=generator)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])


def mask_ratio_per_sample(spec: CalibrationSpec) -> list[float]:
    return [spec.mask_ratios[i % len(spec.mask_ratios)] for i in range(spec.n_samples)]


def build_calibration(context: StageContext, spec: CalibrationSpec, model: PreparedModel) -> CalibrationSet:
    """Tokenise, window and (for diffusion models) mask the calibration set; save it."""
    import torch
    from safetensors.torch import save_file

    from qrobust.tasks.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model, context.workspace)
    clean = calibration_token_windows(spec, tokenizer, calibration_texts(spec, model))
    tensors = {"input_ids": clean, "attention_mask": torch.ones_like(clean)}
    masked = model.family == "diffusion"
    if masked:
        from qrobust.tasks.models.diffusion import mask_tokens

        ratios = torch.tensor(mask_ratio_per_sample(spec))
        generator = torch.Generator().manual_seed(spec.seed + 1)
        masked_ids, positions = mask_tokens(
            clean, torch.ones_like(clean, dtype=torch.bool), ratios, model.mask_token_id, generator
        )
        tensors |= {"masked_input_ids": masked_ids, "masked_positions": positions, "mask_ratios": ratios}
    save_file(tensors, context.directory / TENSORS)
    return CalibrationSet(key=context.key, family=model.family, n_samples=spec.n_samples, seq_len=spec.seq_len,
                          source=spec.source, masked=masked)


def load_calibration(calibration: CalibrationSet, workspace) -> dict:
    from safetensors.torch import load_file

    return load_file(calibration.directory(workspace) / TENSORS)


def gptq_calibration_examples(calibration: CalibrationSet, workspace) -> list[dict]:
    """The calibration set as gptqmodel takes it: what the model sees at inference."""
    tensors = load_calibration(calibration, workspace)
    ids = tensors.get("masked_input_ids", tensors["input_ids"])
    return [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]


STAGE = Stage("calibration", build_calibration, CalibrationSet, libraries=("torch", "transformers", "tokenizers",
                                                                           "datasets", "safetensors"))
