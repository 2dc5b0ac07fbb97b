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
from qrobust.tasks.config import DEFAULT_HARNESS, GenerationSpec
from qrobust.tasks.decoding import decoder, decoder_module
from qrobust.tasks.runtime.provenance import environment
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
    """Every sample of a shard's problems from one checkpoint of a model `family`, in a prompt style.

    First-use costs (kernel builds while the checkpoint loads, autotuning, a cache's first
    allocation) are paid before the timed generation: the load and a short warm-up on the shard's
    first batch are timed together (`warmup_seconds`), never in `gen_seconds`.
    """
    from qrobust.tasks.models.loading import kernel_names, load_model, load_tokenizer, model_parameter_bytes
    from qrobust.tasks.runtime.environment import default_device
    from qrobust.tasks.runtime.measure import measure

    decoding = decoder(family)
    device = default_device()
    g = generation
    # gptqmodel builds its kernels (Marlin: minutes on a fresh machine) while it loads a checkpoint,
    # so the warm-up is timed from the load on.
    loading_began = time.perf_counter()
    model = load_model(checkpoint, context.workspace, device, weights=g.weights, kernel=g.kernel)
    tokenizer = load_tokenizer(checkpoint, context.workspace)
    fmt = benchmark_format(shard.benchmark, prompt_style)
    problems = shard.problems()
    prompts = prompts_for(problems, fmt, tokenizer)
    batch_size = g.batch_size if g.batch_size != "auto" else decoding.auto_batch_size(model, device)
    batches = (length_sorted_batches(prompts, tokenizer, batch_size) if g.harness == DEFAULT_HARNESS
               else in_order_batches(len(prompts), batch_size))  # the published harness batches in its order
    decoding.answers(model, tokenizer, [prompts[i] for i in batches[0]], decoding.warm_up_settings(g), checkpoint,
                     g.seed, fmt.stop_strings)
    warmup_seconds = time.perf_counter() - loading_began
    records = {}
    counter = TokenCounter(model)
    with measure(device) as shard_measurement, counter:
        for sample_idx in range(g.n_samples):
            for batch in batches:
                began = time.perf_counter()
                answers, counts = decoding.answers(
                    model, tokenizer, [prompts[i] for i in batch], g, checkpoint, g.seed + sample_idx, fmt.stop_strings
                )
                per_sample = (time.perf_counter() - began) / len(answers)
                for index, answer, count in zip(batch, answers, counts):
                    records[(sample_idx, index)] = {
                        "task_id": problems[index].task_id,
                        "sample_idx": sample_idx,
                        "answer": answer,
                        "completion": postprocess(answer, fmt, problems[index]),
                        "gen_tokens": count,
                        "gen_seconds": per_sample,
                    }
    with open(context.directory / COMPLETIONS, "w") as out:
        for _, record in sorted(records.items()):
            out.write(json.dumps(record) + "\n")
    kernel = ",".join(kernel_names(model)) if checkpoint.quantized else "dense"
    return GeneratedShard(
        key=context.key,
        task_ids=shard.task_ids,
        n_records=len(records),
        gen_seconds=shard_measurement.seconds,
        gen_tokens=sum(r["gen_tokens"] for r in records.values()),
        peak_mem_bytes=shard_measurement.peak_bytes,
        # a full-precision model is measured as it runs (its file may hold another dtype)
        model_bytes=checkpoint.model_bytes if checkpoint.quantized else model_parameter_bytes(model),
        device=device,
        environment=environment(device, checkpoint.dtype),
        kernel=kernel or "dequantized",
        warmup_seconds=warmup_seconds,
        batch_size=batch_size,
        model_tokens=counter.tokens,
    )


class TokenCounter:
    """Tokens through the decoder backbone while active: with its matmul parameter count, the work
    the generation did (every forward pass, prompt and answer positions, padding included)."""

    def __init__(self, model) -> None:
        self.backbone = getattr(model, "model", model)
        self.tokens = 0
        self._hook = None

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        self.tokens += int(shape[0] * shape[1])

    def __enter__(self) -> "TokenCounter":
        self._hook = self.backbone.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> bool:
        self._hook.remove()
        return False


def in_order_batches(count: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def length_sorted_batches(prompts: list[str], tokenizer, batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (shortest first), so that little of a batch is padding."""
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
