"""Generation stage: the answers of one shard of problems, for one cell.

A shard is a fixed, ordered slice of a benchmark's problems; its output is a JSONL file
of completions (one line per problem x sample) with the raw answer, the post-processed
completion, tokens and time, plus the shard's wall time and peak memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qrobust.tasks.benchmarks import (
    Problem,
    benchmark_format,
    load_problems,
    postprocess,
    render_generation_prefix,
    render_prompt,
)
from qrobust.tasks.config import Cell, GenerationSpec, config_hash
from qrobust.tasks.runtime.workspace import Workspace, read_manifest, write_manifest

COMPLETIONS = "completions.jsonl"


def shard_task_ids(cell: Cell) -> list[tuple[str, ...]]:
    ids = [p.task_id for p in load_problems(cell.benchmark)]
    size = cell.generation.shard_size
    return [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]


def sampler_settings(generation: GenerationSpec, logits_shift: bool):
    from qrobust.tasks.decoding.diffusion import DiffusionSamplerSettings

    return DiffusionSamplerSettings(
        max_new_tokens=generation.max_new_tokens,
        steps=generation.steps,
        alg=generation.alg,
        temperature=generation.temperature or None,
        top_p=generation.top_p,
        top_k=generation.top_k,
        alg_temp=generation.alg_temp,
        eps=generation.eps,
        block_length=generation.block_length,
        logits_shift=logits_shift,
    )


def chat_prompt(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    except TypeError:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompts_for(problems: list[Problem], cell: Cell, tokenizer) -> list[str]:
    """The full model input of each problem: the prompt, in the model's chat template where the
    format uses one, followed by the format's generation prefix (which the answer continues)."""
    fmt = benchmark_format(cell.benchmark.name, cell.model.prompt_style)
    texts = []
    for problem in problems:
        text = render_prompt(problem, fmt)
        if fmt.uses_chat_template:
            text = chat_prompt(tokenizer, text)
        texts.append(text + render_generation_prefix(problem, fmt))
    return texts


def diffusion_answers(model, tokenizer, prompts: list[str], generation: GenerationSpec, manifest: dict, seed: int):
    import torch

    from qrobust.tasks.decoding.diffusion import diffusion_generate, truncate_at_stop
    from qrobust.tasks.models.diffusion import diffusion_logits_at

    shift = manifest["logits_shift"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.inference_mode():
        # the sampler asks only for the positions it scores: lm_head runs on those alone
        tokens = diffusion_generate(
            lambda ids, mask, positions: diffusion_logits_at(model, ids, mask, positions, shift),
            encoded["input_ids"],
            encoded["attention_mask"],
            sampler_settings(generation, shift),
            manifest["mask_token_id"],
            generator,
            logits_at_positions=True,
        )
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    answers = [truncate_at_stop(row, stops, mask_token_id=manifest["mask_token_id"]) for row in tokens]
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers], [len(a) for a in answers]


def generate_answers(model, tokenizer, prompts, cell: Cell, manifest: dict, seed: int, stop_strings):
    g = cell.generation
    if manifest["family"] == "diffusion":
        return diffusion_answers(model, tokenizer, prompts, g, manifest, seed)
    from qrobust.tasks.decoding.ar import ar_generate

    return ar_generate(model, tokenizer, prompts, g.max_new_tokens, g.temperature, g.top_p, g.top_k, seed, stop_strings)


def generate_shard(cell: Cell, checkpoint: dict, task_ids: tuple[str, ...], workspace: Workspace) -> dict:
    """Generate every sample of a shard's problems; returns the shard's manifest."""
    key = config_hash({"cell": cell.cell_id, "checkpoint": checkpoint["key"], "task_ids": task_ids})
    directory = workspace.artifact_dir("generations", key)
    if (directory / "manifest.json").exists():
        return read_manifest(directory)

    from qrobust.tasks.runtime.measure import measure
    from qrobust.tasks.models.loading import default_device, load_model, load_tokenizer, model_parameter_bytes

    device = default_device()
    model = load_model(checkpoint, device, weights=cell.generation.weights)
    tokenizer = load_tokenizer(checkpoint)
    fmt = benchmark_format(cell.benchmark.name, cell.model.prompt_style)
    by_id = {p.task_id: p for p in load_problems(cell.benchmark)}
    problems = [by_id[t] for t in task_ids]
    prompts = prompts_for(problems, cell, tokenizer)
    g = cell.generation
    records = []
    with measure(device) as shard_measurement:
        for sample_idx in range(g.n_samples):
            for start in range(0, len(problems), g.batch_size):
                batch = slice(start, start + g.batch_size)
                began = time.perf_counter()
                answers, counts = generate_answers(
                    model, tokenizer, prompts[batch], cell, checkpoint, g.seed + sample_idx, fmt.stop_strings
                )
                per_sample = (time.perf_counter() - began) / len(answers)
                for problem, answer, count in zip(problems[batch], answers, counts):
                    records.append(
                        {
                            "task_id": problem.task_id,
                            "sample_idx": sample_idx,
                            "answer": answer,
                            "completion": postprocess(answer, fmt),
                            "gen_tokens": count,
                            "gen_seconds": per_sample,
                        }
                    )
    with workspace.new_artifact("generations", key) as scratch:
        with open(scratch / COMPLETIONS, "w") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
        write_manifest(
            scratch,
            {
                "key": key,
                "path": str(directory),
                "cell_id": cell.cell_id,
                "task_ids": list(task_ids),
                "n_records": len(records),
                "gen_seconds": shard_measurement.seconds,
                "gen_tokens": sum(r["gen_tokens"] for r in records),
                "peak_mem_bytes": shard_measurement.peak_bytes,
                # a full-precision model is measured as it runs (its file may hold another dtype)
                "model_bytes": checkpoint["model_bytes"] if checkpoint.get("quantized") else model_parameter_bytes(model),
                "device": device,
            },
        )
    return read_manifest(directory)


def read_completions(manifest: dict) -> list[dict]:
    path = Path(manifest["path"]) / COMPLETIONS
    return [json.loads(line) for line in path.read_text().splitlines() if line]
