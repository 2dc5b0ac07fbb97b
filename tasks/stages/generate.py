"""Generation stage: the answers of one shard of problems from one checkpoint.

A shard is a fixed, ordered slice of a benchmark's problems; its output is a JSONL file
of completions (one line per problem x sample) with the raw answer, the post-processed
completion, tokens and time, plus the shard's wall time and peak memory. Batches are
consecutive slices of `batch_size` problems in shard order, the order the published harness
answers them in (`generation.harness`; the decoder of the model's family applies it).
"""

from __future__ import annotations

import json
import time

from qrobust.tasks.artifacts import Checkpoint, GeneratedShard
from qrobust.tasks.benchmarks import (
    BenchmarkFormat,
    Problem,
    ProblemShard,
    benchmark_format,
    postprocess,
    render_generation_prefix,
    render_prompt,
)
from qrobust.tasks.config import GenerationSpec
from qrobust.tasks.decoding import decoder, decoder_module
from qrobust.tasks.runtime.stage import Stage, StageContext

COMPLETIONS = "completions.jsonl"


def chat_prompt(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    except TypeError:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompts_for(problems: list[Problem], fmt: BenchmarkFormat, tokenizer) -> list[str]:
    """The full model input of each problem: the prompt, in the model's chat template where the
    format uses one, followed by the format's generation prefix (which the answer continues)."""
    texts = []
    for problem in problems:
        text = render_prompt(problem, fmt)
        if fmt.uses_chat_template:
            text = chat_prompt(tokenizer, text)
        texts.append(text + render_generation_prefix(problem, fmt))
    return texts


def generate_shard(context: StageContext, shard: ProblemShard, prompt_style: str, generation: GenerationSpec,
                   family: str, checkpoint: Checkpoint) -> GeneratedShard:
    """Every sample of a shard's problems from one checkpoint of a model `family`, in a prompt style."""
    from qrobust.tasks.models.loading import load_model, load_tokenizer, model_parameter_bytes
    from qrobust.tasks.runtime.environment import default_device
    from qrobust.tasks.runtime.measure import measure

    decode = decoder(family).answers
    device = default_device()
    model = load_model(checkpoint, context.workspace, device, weights=generation.weights)
    tokenizer = load_tokenizer(checkpoint, context.workspace)
    fmt = benchmark_format(shard.benchmark, prompt_style)
    problems = shard.problems()
    prompts = prompts_for(problems, fmt, tokenizer)
    g = generation
    records = []
    with measure(device) as shard_measurement:
        for sample_idx in range(g.n_samples):
            for start in range(0, len(problems), g.batch_size):
                batch = slice(start, start + g.batch_size)
                began = time.perf_counter()
                answers, counts = decode(
                    model, tokenizer, prompts[batch], g, checkpoint, g.seed + sample_idx, fmt.stop_strings
                )
                per_sample = (time.perf_counter() - began) / len(answers)
                for problem, answer, count in zip(problems[batch], answers, counts):
                    records.append({
                        "task_id": problem.task_id,
                        "sample_idx": sample_idx,
                        "answer": answer,
                        "completion": postprocess(answer, fmt, problem),
                        "gen_tokens": count,
                        "gen_seconds": per_sample,
                    })
    with open(context.directory / COMPLETIONS, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return GeneratedShard(
        key=context.key,
        task_ids=shard.task_ids,
        n_records=len(records),
        gen_seconds=shard_measurement.seconds,
        gen_tokens=sum(r["gen_tokens"] for r in records),
        peak_mem_bytes=shard_measurement.peak_bytes,
        # a full-precision model is measured as it runs (its file may hold another dtype)
        model_bytes=checkpoint.model_bytes if checkpoint.quantized else model_parameter_bytes(model),
        device=device,
    )


def read_completions(generated: GeneratedShard, workspace) -> list[dict]:
    """The shard's records: task_id, sample_idx, answer (raw), completion (cleaned), gen_tokens, gen_seconds."""
    path = generated.directory(workspace) / COMPLETIONS
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def decoding_code(inputs: tuple) -> tuple[str, ...]:
    """The decoder of the model's family is part of a shard's code; the other family's is not."""
    family = inputs[3]
    return (decoder_module(family),)


STAGE = Stage("generate", generate_shard, GeneratedShard,
              libraries=("torch", "transformers", "tokenizers", "gptqmodel", "safetensors"), loads_model=True,
              code_for=decoding_code)
