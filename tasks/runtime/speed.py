"""Speeds against floors: what the device can do, what a generation did, and what a grid will cost.

- AR: decoding is bound by reading the weights once per step; the floor is `batch` tokens per
  `weight bytes / copy bandwidth` (the device's measured copy rate, read plus write);
- diffusion: every step is a forward pass over the whole window; the floor is the measured
  matrix-product rate, and the work is 2 x (decoder matmul parameters) x (tokens through the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

FULL_BENCHMARK_PROBLEMS = {"humaneval": 164, "mbpp": 500}


@dataclass(frozen=True)
class BenchRow:
    cell: str
    model: str
    family: str
    method: str
    benchmark: str
    device: str
    dtype: str
    kernel: str
    batch_size: int
    problems: int
    gen_seconds: float
    warmup_seconds: float
    seconds_per_sample: float
    tokens_per_s: float
    floor: float  # tokens/s (AR) or FLOP/s (diffusion) the device allows
    achieved: float  # tokens/s (AR) or FLOP/s (diffusion) measured
    ratio: float
    floor_kind: str
    peak_mem_bytes: int
    stage_seconds: dict


@dataclass(frozen=True)
class DeviceRates:
    device: str
    copy_bytes_per_s: float
    matmul_flops_per_s: dict  # by dtype


def measure_device(device: str, dtypes: set[str]) -> DeviceRates:
    from qrobust.tasks.runtime.measure import copy_bandwidth, matmul_tflops

    on_gpu = device.startswith("cuda")
    copy = copy_bandwidth(device, (1 << 30) if on_gpu else (1 << 26))
    size = 8192 if on_gpu else 1024
    return DeviceRates(device, copy, {dtype: matmul_tflops(device, size, dtype=dtype) * 1e12 for dtype in dtypes})


def speed_row(cell, checkpoint, shard, rates: DeviceRates, stage_seconds: dict, workspace) -> BenchRow:
    tokens_per_s = shard.gen_tokens / shard.gen_seconds if shard.gen_seconds else 0.0
    if cell.model.family == "ar":
        weight_bytes = shard.model_bytes or checkpoint.model_bytes
        floor = shard.batch_size * rates.copy_bytes_per_s / weight_bytes  # tokens/s with one weight read per step
        achieved, kind = tokens_per_s, "tokens/s at one weight read per step"
    else:
        params = decoder_matmul_params(checkpoint, workspace)
        floor = rates.matmul_flops_per_s[checkpoint.dtype]
        achieved = 2 * params * shard.model_tokens / shard.gen_seconds if shard.gen_seconds else 0.0
        kind = f"{checkpoint.dtype} matmul FLOP/s"
    samples = max(shard.n_records, 1)
    return BenchRow(
        cell=cell.label, model=cell.model.name, family=cell.model.family, method=cell.method.label,
        benchmark=cell.benchmark.name, device=shard.environment["device"] if shard.environment else rates.device,
        dtype=checkpoint.dtype, kernel=shard.kernel, batch_size=shard.batch_size, problems=len(shard.task_ids),
        gen_seconds=shard.gen_seconds, warmup_seconds=shard.warmup_seconds,
        seconds_per_sample=shard.gen_seconds / samples, tokens_per_s=tokens_per_s, floor=floor, achieved=achieved,
        ratio=achieved / floor if floor else 0.0, floor_kind=kind, peak_mem_bytes=shard.peak_mem_bytes,
        stage_seconds=stage_seconds,
    )


def decoder_matmul_params(checkpoint, workspace) -> int:
    """Weights the decoder layers multiply by per token (attention and MLP projections; no embedding,
    no lm_head), from the checkpoint's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.location(workspace), trust_remote_code=checkpoint.trust_remote_code)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * kv_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp)


def estimate_grid_hours(grid, rows: list[BenchRow]) -> list[dict]:
    """Each cell's generation hours at its benchmark's full size and its samples, from the bench row of
    the same model and method (seconds per sample scale with problems x samples)."""
    by_setting = {(row.model, row.method): row for row in rows}
    estimates = []
    for cell in grid.cells():
        row = by_setting.get((cell.model.name, cell.method.label))
        if row is None:
            continue
        problems = cell.benchmark.limit or len(cell.benchmark.task_ids) or FULL_BENCHMARK_PROBLEMS[cell.benchmark.name]
        samples = problems * cell.generation.n_samples
        estimates.append({"cell": cell.label, "samples": samples, "hours": samples * row.seconds_per_sample / 3600})
    return estimates
