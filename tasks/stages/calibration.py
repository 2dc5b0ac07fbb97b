"""Calibration data: N sequences of seq_len tokens for GPTQ and the Hessian stage.

Sources: `stdlib` (the Python standard library's own source files: a code corpus every
machine has, and never a benchmark's test problems), `training-set` (the very sequences a
model trained by the pipeline learned: the only in-distribution data of the tiny demo
models, whose loss on anything else is far from a minimum, so that their Hessian traces
there are indefinite and useless for HAWQ), `wikitext2` (clean English prose, taken as the
study's quantization script takes it: optimum's GPTQ "wikitext2" set, the first 1000 rows of
WikiText-2's raw train split joined into one text; from the hub, or from a local file with
`path`) or any other Hugging Face dataset name (on a machine with hub access).

A diffusion model sees partly masked inputs at inference, so by default its calibration
inputs are masked at varied ratios (`mask_ratios`, cycled over samples), as the d-LLM
quantization papers recommend; the clean tokens are kept beside them for the denoising loss.
`mask_ratios = []` calibrates it on clean text, as an AR model is (and as the study's script did).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from qrobust.tasks.artifacts import CalibrationSet, PreparedModel
from qrobust.tasks.config import CalibrationSpec, ConfigError
from qrobust.tasks.runtime.stage import Stage, StageContext

LOCAL_SOURCES = ("stdlib", "training-set")
TENSORS = "calibration.safetensors"
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT2_ROWS = 1000  # what optimum's get_wikitext2 reads of the train split
WIKITEXT2_SAMPLE = "data/calibration/wikitext2_sample.txt"  # a bundled stand-in in WikiText's raw layout


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
    if spec.source == "wikitext2":
        return [wikitext2_text(wikitext2_rows(spec.path))]
    return hub_texts(spec)


def wikitext2_rows(path: str | None) -> list[str]:
    """WikiText-2 raw train rows: a local file (one row per line, a blank line an empty row, as
    the dataset's rows are) or the hub's."""
    if path is not None:
        from qrobust.tasks.benchmarks import resolve_data_path

        return [line + "\n" if line.strip() else "" for line in resolve_data_path(path).read_text().splitlines()]
    try:
        from datasets import load_dataset

        return list(load_dataset(*WIKITEXT2, split="train")["text"])
    except Exception as exc:
        raise ConfigError(
            f"calibration source 'wikitext2' could not be loaded from the hub ({type(exc).__name__}); "
            f"set path = '{WIKITEXT2_SAMPLE}' (or a local copy of WikiText-2's raw train text)"
        ) from None


def wikitext2_text(rows: list[str]) -> str:
    """The study's calibration text: the first `WIKITEXT2_ROWS` rows joined, each empty row read as " \n"."""
    return "".join(" \n" if row == "" else row for row in rows[:WIKITEXT2_ROWS])


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
    masked = model.family == "diffusion" and bool(spec.mask_ratios)
    if masked:
        from qrobust.tasks.models.diffusion import mask_tokens

        ratios = torch.tensor(mask_ratio_per_sample(spec), dtype=torch.float32)  # not the process's default dtype
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
