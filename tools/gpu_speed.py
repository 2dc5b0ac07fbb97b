"""Speed and memory of the study's models on one GPU: what a grid run will cost.

Builds Qwen3-1.7B and CoDA-1.7B at their real shapes with random weights (kernel speed
does not depend on weight values) in bf16 and in GPTQ 2/3/4/8 bits, and measures:

- the card: bf16 matmul rate (8192^3) and device-to-device copy bandwidth, in the same run;
- checkpoint bytes (weights as gptqmodel saves them) and peak device memory;
- AR (Qwen3): prefill latency and per-token decode latency with a static KV cache, eager
  and replayed as a CUDA graph;
- diffusion (CoDA): forward-pass time and achieved TFLOP/s at the full answer window, and
  seconds per denoising step of the pipeline's own sampler, extrapolated to the study's
  768 steps;
- GPTQ quantization time (4 bits, measured on a few layers, extrapolated to 28) and the
  Hutchinson Hessian-trace time per probe (measured on a few batches, extrapolated).

Quantized models are built by putting gptqmodel's inference kernels (the classes its
loader would pick) in place of every decoder Linear, with random packed weights.

Results go to a JSON file, one record per configuration, written after each one; a run
given an existing file skips what it already holds, so a run cut short resumes.

    python -m qrobust.tools.gpu_speed run --results speed-results.json --markdown docs/gpu-benchmarks.md
    python -m qrobust.tools.gpu_speed report --results speed-results.json --markdown docs/gpu-benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qrobust.tasks.runtime.measure import copy_bandwidth, matmul_tflops, synchronize, time_calls

# --------------------------------------------------------------------------- shapes and settings


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a Qwen3-style decoder's cost (no biases, untied lm_head)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def with_layers(self, layers: int) -> "ModelShape":
        return dataclasses.replace(self, layers=layers)

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each Linear of one decoder layer, by its name."""
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (self.hidden, q_width),
            "self_attn.k_proj": (self.hidden, kv_width),
            "self_attn.v_proj": (self.hidden, kv_width),
            "self_attn.o_proj": (q_width, self.hidden),
            "mlp.gate_proj": (self.hidden, self.intermediate),
            "mlp.up_proj": (self.hidden, self.intermediate),
            "mlp.down_proj": (self.intermediate, self.hidden),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.layer_linears().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        """Input and post-attention RMSNorms and q/k norms per layer, plus the final norm."""
        return self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden

    @property
    def params(self) -> int:
        # embedding + untied lm_head + decoder linears + norms
        return 2 * self.embedding_params + self.layers * self.layer_linear_params + self.norm_params


# Qwen3-1.7B; CoDA-1.7B is the same backbone run with bidirectional attention.
REAL_SHAPE = ModelShape(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab=151936)
TINY_SHAPE = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512)
SHAPES = {"real": REAL_SHAPE, "tiny": TINY_SHAPE}
CODA_MASK_TOKEN_ID = 151669
AR_MODEL, DIFFUSION_MODEL = "Qwen3-1.7B", "CoDA-1.7B"


@dataclass(frozen=True)
class WeightFormat:
    """How the decoder Linears are stored: bf16, or GPTQ at `bits` run by `cuda_backend`
    (a gptqmodel BACKEND value) on a GPU. On CPU every GPTQ format runs gptqmodel's torch kernel."""

    name: str
    bits: int | None = None
    cuda_backend: str | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def backend_for(self, device: str) -> str:
        return self.cuda_backend if device.startswith("cuda") else "gptq_torch"


FORMATS = {
    "bf16": WeightFormat("bf16"),
    # Marlin takes 4 and 8 bits; gptqmodel's Triton kernel takes 2/4/8, so 3 bits falls to Torch.
    "gptq4": WeightFormat("gptq4", 4, "gptq_marlin"),
    "gptq8": WeightFormat("gptq8", 8, "gptq_marlin"),
    "gptq2": WeightFormat("gptq2", 2, "gptq_triton"),
    "gptq3": WeightFormat("gptq3", 3, "gptq_torch"),
}


@dataclass(frozen=True)
class BenchSettings:
    """Workload sizes. Defaults are the study's generation settings (CoDA's official coding
    eval: 768 new tokens, 768 steps, temperature 0.1, top_p 0.9, alg entropy)."""

    batches: tuple[int, ...] = (1, 32)
    prompt_tokens: int = 200
    answer_tokens: int = 768
    diffusion_steps: int = 768
    measured_steps: int = 4
    decode_tokens: int = 32
    repeats: int = 3
    group_size: int = 32
    temperature: float = 0.1
    top_p: float = 0.9
    alg: str = "entropy"
    calibration_samples: int = 128
    calibration_seq_len: int = 512
    gptq_layers: tuple[int, int] = (2, 4)
    hessian_batch_size: int = 4
    hessian_batches: tuple[int, int] = (1, 3)
    hutchinson_probes: int = 16
    matmul_size: int = 8192
    copy_bytes: int = 1 << 30


TINY_SETTINGS = BenchSettings(
    batches=(1, 2), prompt_tokens=6, answer_tokens=8, diffusion_steps=8, measured_steps=2, decode_tokens=3,
    repeats=2, group_size=32, calibration_samples=4, calibration_seq_len=16, gptq_layers=(1, 2),
    hessian_batch_size=2, hessian_batches=(1, 2), matmul_size=64, copy_bytes=1 << 16,
)

# --------------------------------------------------------------------------- arithmetic


def forward_flops(shape: ModelShape, batch: int, seq_len: int, causal: bool, logit_positions: int | None = None) -> float:
    """Floating-point operations of one forward pass: 2 per multiply-add of every decoder
    Linear and of lm_head (the embedding is a lookup), plus attention's two products
    (scores and weighted values), over key/query pairs that attention may use."""
    tokens = batch * seq_len
    linears = 2 * shape.layer_linear_params * shape.layers * tokens
    head = 2 * shape.embedding_params * batch * (seq_len if logit_positions is None else logit_positions)
    pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    attention = 4 * shape.layers * shape.heads * shape.head_dim * batch * pairs
    return float(linears + head + attention)


def gptq_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of one Linear in gptqmodel's GPTQ checkpoint format: int32 qweight
    [in*bits/32, out], int32 qzeros [groups, out*bits/32], fp16 scales [groups, out], int32 g_idx [in]."""
    groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    qweight = in_features * bits // 32 * out_features * 4
    qzeros = groups * math.ceil(out_features * bits / 32) * 4
    scales = groups * out_features * 2
    return qweight + qzeros + scales + in_features * 4


def checkpoint_bytes(shape: ModelShape, bits: int | None, group_size: int) -> int:
    """Bytes of the weights as saved: bf16 everything, or GPTQ decoder Linears with bf16
    embedding, lm_head and norms."""
    if bits is None:
        return 2 * shape.params
    kept_bf16 = 2 * shape.embedding_params + shape.norm_params
    per_layer = sum(gptq_linear_bytes(i, o, bits, group_size) for i, o in shape.layer_linears().values())
    return 2 * kept_bf16 + shape.layers * per_layer


def bandwidth_floor_seconds(bytes_read: int, read_bytes_per_second: float) -> float:
    """Least time to stream `bytes_read` through device memory once."""
    return bytes_read / read_bytes_per_second


def extrapolate_linearly(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    """The line through (x1, y1) and (x2, y2), evaluated at x."""
    return y1 + (x - x1) * (y2 - y1) / (x2 - x1)


def diffusion_forward_passes(answer_tokens: int, steps: int, alg: str) -> int:
    """Forward passes the sampler runs for a whole answer (steps that commit nothing are skipped)."""
    from qrobust.tasks.decoding.diffusion import DiffusionSamplerSettings, denoising_schedule

    settings = DiffusionSamplerSettings(max_new_tokens=answer_tokens, steps=steps, alg=alg)
    return sum(1 for step in denoising_schedule(settings) if step.transfer_prob is not None or step.commit_count)


# --------------------------------------------------------------------------- timing


# --------------------------------------------------------------------------- models


def qwen3_config(shape: ModelShape):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


def build_random_model(shape: ModelShape, device: str, dtype_name: str = "bfloat16", seed: int = 0):
    """A Qwen3ForCausalLM of `shape` with random weights, created directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    from qrobust.tasks.models.loading import torch_dtype

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            qwen3_config(shape), dtype=torch_dtype(dtype_name), attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False)


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def gptq_kernel_class(bits: int, group_size: int, backend: str, device: str, dtype):
    """The gptqmodel inference kernel for `backend`, chosen by gptqmodel's own selector."""
    return _select_gptq_kernels(bits, group_size, backend, device, dtype, every_candidate=False)


def auto_kernel_candidates(bits: int, group_size: int, device: str, dtype) -> list[str]:
    """What gptqmodel's loader would consider, best first, for a checkpoint of `bits` here."""
    candidates = _select_gptq_kernels(bits, group_size, "auto", device, dtype, every_candidate=True)
    return [kernel.__name__ for kernel in candidates]


def _select_gptq_kernels(bits: int, group_size: int, backend: str, device: str, dtype, every_candidate: bool):
    import torch
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    return select_quant_linear(
        bits=bits, group_size=group_size, desc_act=False, sym=True, device=_gptq_device(device),
        backend=BACKEND(backend), format=FORMAT.GPTQ, quant_method=METHOD.GPTQ, pack=False,
        pack_dtype=torch.int32, dtype=dtype, multi_select=every_candidate,
    )


def _gptq_device(device: str):
    from gptqmodel.models._const import DEVICE

    return DEVICE.CUDA if device.startswith("cuda") else DEVICE.CPU


def replace_linears_with_gptq(model, bits: int, group_size: int, backend: str, device: str) -> str:
    """Put a gptqmodel kernel with random packed weights in place of every decoder Linear
    that GPTQ quantizes; returns the kernel's class name. Call `finish_gptq_kernels` after
    reading the checkpoint bytes (some kernels repack their buffers there)."""
    import torch
    from gptqmodel.quantization import FORMAT
    from gptqmodel.utils.backend import BACKEND

    from qrobust.tasks.numerics.curvature import quantizable_linears

    dtype = next(model.parameters()).dtype
    kernel = gptq_kernel_class(bits, group_size, backend, device, dtype)
    generator = _device_generator(device, seed=1)
    for name, linear in quantizable_linears(model).items():
        module = kernel(
            bits=bits, group_size=group_size, desc_act=False, sym=True, in_features=linear.in_features,
            out_features=linear.out_features, pack_dtype=torch.int32, bias=False, dtype=dtype, name=name,
            lm_head_name="lm_head", backend=BACKEND(backend), register_buffers=True, format=FORMAT.GPTQ,
        ).to(device)
        fill_random_gptq_buffers(module, group_size, generator)
        model.set_submodule(name, module)
    return kernel.__name__


def fill_random_gptq_buffers(module, group_size: int, generator) -> None:
    """Random packed weights and zero points, scales that keep activations finite, and
    the group index a checkpoint without act-order holds."""
    import torch

    full_range = (-(2**31), 2**31 - 1)
    module.qweight.copy_(torch.randint(*full_range, module.qweight.shape, generator=generator,
                                       device=module.qweight.device, dtype=torch.int32))
    module.qzeros.copy_(torch.randint(*full_range, module.qzeros.shape, generator=generator,
                                      device=module.qzeros.device, dtype=torch.int32))
    scales = torch.rand(module.scales.shape, generator=generator, device=module.scales.device)
    module.scales.copy_(scales * 2e-3 + 1e-3)
    size = group_size if group_size != -1 else module.in_features
    module.g_idx.copy_(torch.arange(module.in_features, device=module.g_idx.device, dtype=torch.int32) // size)


def finish_gptq_kernels(model) -> None:
    """gptqmodel's post-load step: scratch buffers and weight repacking (Marlin)."""
    from gptqmodel.utils.model import gptqmodel_post_init

    gptqmodel_post_init(model, use_act_order=False)


def _device_generator(device: str, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def free_device_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- AR: prefill and decode


def cache_keyword(model) -> str:
    """The forward's name for the KV cache (transformers renamed past_key_values to cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def causal_prefill_mask(batch: int, prompt_len: int, max_len: int, device) -> "torch.Tensor":
    """Boolean [B, 1, P, max_len]: prompt position i sees cache slots 0..i."""
    import torch

    queries = torch.arange(prompt_len, device=device)[:, None]
    keys = torch.arange(max_len, device=device)[None, :]
    return (keys <= queries).expand(batch, 1, prompt_len, max_len)


def prefill(model, cache, prompt_ids, max_len: int):
    """Run the prompt into the (reset) static cache of `max_len` slots; returns the last
    position's logits [B, V]."""
    import torch

    batch, prompt_len = prompt_ids.shape
    positions = torch.arange(prompt_len, device=prompt_ids.device).expand(batch, prompt_len)
    mask = causal_prefill_mask(batch, prompt_len, max_len, prompt_ids.device)
    output = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{cache_keyword(model): cache})
    return output.logits[:, -1]


@dataclass
class DecodeState:
    """Device tensors one greedy decode step reads and updates in place, so that the step
    can be captured once as a CUDA graph and replayed."""

    token: "torch.Tensor"  # [B, 1] the token to feed
    position: "torch.Tensor"  # [B, 1] its position (= cache slot)
    mask: "torch.Tensor"  # [B, 1, 1, max_len] cache slots visible to it
    slots: "torch.Tensor"  # [max_len] 0..max_len-1


def start_decoding(model, cache, prompt_ids, max_len: int) -> DecodeState:
    import torch

    batch, prompt_len = prompt_ids.shape
    cache.reset()
    with torch.no_grad():
        logits = prefill(model, cache, prompt_ids, max_len)
    slots = torch.arange(max_len, device=prompt_ids.device)
    return DecodeState(
        token=logits.argmax(-1, keepdim=True),
        position=torch.full((batch, 1), prompt_len, device=prompt_ids.device, dtype=torch.long),
        mask=(slots < prompt_len).expand(batch, 1, 1, -1).clone(),
        slots=slots,
    )


def decode_step(model, cache, state: DecodeState) -> None:
    """Feed `state.token`, then set it to the greedy next token and advance one position."""
    import torch

    with torch.no_grad():
        state.mask |= state.slots == state.position[:, :, None, None]
        output = model(input_ids=state.token, attention_mask=state.mask, position_ids=state.position,
                       use_cache=True, **{cache_keyword(model): cache})
        state.token.copy_(output.logits[:, -1].argmax(-1, keepdim=True))
        state.position.add_(1)


def capture_decode_graph(model, cache, state: DecodeState, warmup: int = 2):
    """`decode_step` captured as a CUDA graph (warm-up on a side stream, as capture requires)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            decode_step(model, cache, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(model, cache, state)
    return graph


def random_prompt(batch: int, length: int, vocab: int, device: str, seed: int = 2):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, length), generator=generator).to(device)


def measure_ar(model, shape: ModelShape, batch: int, settings: BenchSettings, device: str) -> dict:
    """Prefill and per-token decode latency (eager; CUDA graph on a GPU) and peak memory."""
    from qrobust.tasks.runtime.measure import measure

    prompt = random_prompt(batch, settings.prompt_tokens, shape.vocab, device)
    max_len = static_cache_length(settings)
    # prefill, eager warm-up and steps, graph warm-up and replays all advance the cache
    if settings.prompt_tokens + 2 * (settings.decode_tokens + 4) > max_len:
        raise ValueError(f"{settings.decode_tokens} decode tokens twice do not fit a cache of {max_len} slots")
    cache = new_static_cache(model, max_len)
    with measure(device) as whole:
        prefill_s = time_calls(lambda: _no_grad(prefill, model, cache, prompt, max_len), device, warmup=1,
                               repeats=settings.repeats, before=cache.reset)
        state = start_decoding(model, cache, prompt, max_len)
        eager_s = time_calls(lambda: decode_step(model, cache, state), device, warmup=2,
                             repeats=settings.decode_tokens)
        graph = _graph_decode_seconds(model, cache, state, settings, device)
    record = {
        "prefill_s": statistics.median(prefill_s),
        "prefill_tokens_per_s": batch * settings.prompt_tokens / statistics.median(prefill_s),
        "decode_eager_s": statistics.median(eager_s),
        "peak_bytes": whole.peak_bytes,
        "max_cache_len": max_len,
        **graph,
    }
    record["decode_best_s"] = min(s for s in (record["decode_eager_s"], record.get("decode_graph_s")) if s)
    return record


def static_cache_length(settings: BenchSettings) -> int:
    """Prompt plus answer, rounded up to a multiple of 64 (the attention kernels' mask alignment)."""
    return -(-(settings.prompt_tokens + settings.answer_tokens) // 64) * 64


def _graph_decode_seconds(model, cache, state: DecodeState, settings: BenchSettings, device: str) -> dict:
    if not device.startswith("cuda"):
        return {"decode_graph_s": None, "decode_graph_error": "CUDA graphs need a GPU"}
    try:
        graph = capture_decode_graph(model, cache, state)
    except Exception as error:  # a kernel that cannot be captured: report eager only
        return {"decode_graph_s": None, "decode_graph_error": one_line(error)}
    seconds = time_calls(graph.replay, device, warmup=2, repeats=settings.decode_tokens)
    return {"decode_graph_s": statistics.median(seconds)}


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


# --------------------------------------------------------------------------- diffusion


def sampler_settings(settings: BenchSettings, steps: int):
    from qrobust.tasks.decoding.diffusion import DiffusionSamplerSettings

    return DiffusionSamplerSettings(
        max_new_tokens=settings.answer_tokens, steps=steps, alg=settings.alg,
        temperature=settings.temperature, top_p=settings.top_p,
    )


def measure_diffusion(model, shape: ModelShape, batch: int, settings: BenchSettings, device: str,
                      mask_token_id: int) -> dict:
    """Forward time at the full window (`diffusion_logits`) and as the sampler runs it
    (`diffusion_logits_at`, lm_head on the answer only), and seconds per denoising step of
    the pipeline's sampler over `measured_steps` steps, extrapolated to the study's steps."""
    import torch

    from qrobust.tasks.decoding.diffusion import diffusion_generate
    from qrobust.tasks.runtime.measure import measure
    from qrobust.tasks.models.diffusion import diffusion_logits, diffusion_logits_at

    prompt = random_prompt(batch, settings.prompt_tokens, min(shape.vocab, mask_token_id), device)
    prompt_mask = torch.ones_like(prompt)
    window = torch.cat([prompt, prompt.new_full((batch, settings.answer_tokens), mask_token_id)], dim=1)
    window_mask = torch.ones_like(window)
    answer = torch.arange(settings.prompt_tokens, window.shape[1], device=device).expand(batch, -1)
    logits_at = lambda ids, mask, positions: diffusion_logits_at(model, ids, mask, positions)  # noqa: E731
    with torch.no_grad(), measure(device) as forward_block:
        forward_s = time_calls(lambda: diffusion_logits(model, window, window_mask), device, warmup=1,
                               repeats=settings.repeats)
    with torch.no_grad(), measure(device) as answer_block:
        answer_forward_s = time_calls(lambda: logits_at(window, window_mask, answer), device, warmup=1,
                                      repeats=settings.repeats)
    generator = torch.Generator(device=device).manual_seed(3)

    def sample(steps: int):
        return diffusion_generate(logits_at, prompt, prompt_mask, sampler_settings(settings, steps),
                                  mask_token_id, generator, return_stats=True, logits_at_positions=True)

    step_s, peak = [], 0
    with torch.no_grad():
        sample(1)  # warm-up: every kernel of a step, once
        for _ in range(settings.repeats):
            with measure(device) as run:
                _, stats = sample(settings.measured_steps)
            step_s.append(run.seconds / stats.forward_passes)
            peak = max(peak, run.peak_bytes)
    seq_len = settings.prompt_tokens + settings.answer_tokens
    flops = forward_flops(shape, batch, seq_len, causal=False)
    answer_flops = forward_flops(shape, batch, seq_len, causal=False, logit_positions=settings.answer_tokens)
    passes = diffusion_forward_passes(settings.answer_tokens, settings.diffusion_steps, settings.alg)
    answer_s = statistics.median(step_s) * passes
    return {
        "forward_s": statistics.median(forward_s),
        "forward_flops": flops,
        "forward_tflops": flops / statistics.median(forward_s) / 1e12,
        "forward_peak_bytes": forward_block.peak_bytes,
        "answer_forward_s": statistics.median(answer_forward_s),
        "answer_forward_flops": answer_flops,
        "answer_forward_tflops": answer_flops / statistics.median(answer_forward_s) / 1e12,
        "answer_forward_peak_bytes": answer_block.peak_bytes,
        "bidirectional_unpadded": unpadded_attention_is_bidirectional(model, shape, mask_token_id, device),
        "step_s": statistics.median(step_s),
        "measured_steps": settings.measured_steps,
        "study_forward_passes": passes,
        "answer_s_extrapolated": answer_s,
        "answer_tokens_per_s": batch * settings.answer_tokens / answer_s,
        "peak_bytes": peak,
    }


def unpadded_attention_is_bidirectional(model, shape: ModelShape, mask_token_id: int, device: str) -> bool:
    """Whether the timed forwards (unpadded: no mask, the module flags decide) really were
    bidirectional with this model, kernels and transformers version."""
    import torch

    from qrobust.tasks.models.diffusion import attention_is_bidirectional

    probe = random_prompt(2, 16, min(shape.vocab, mask_token_id), device, seed=7)
    return attention_is_bidirectional(model, probe, torch.ones_like(probe), atol=1e-3)


# --------------------------------------------------------------------------- GPTQ and Hessian time


def calibration_examples(samples: int, seq_len: int, vocab: int, seed: int = 4) -> list[dict]:
    ids = random_prompt(samples, seq_len, vocab, "cpu", seed)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len} for row in ids]


def time_gptq_quantization(shape: ModelShape, bidirectional: bool, bits: int, group_size: int, samples: int,
                           seq_len: int, workdir: Path, device: str) -> float:
    """Wall seconds of what the pipeline's quantization stage does: load the base checkpoint
    with gptqmodel, quantize with `samples` calibration sequences, save."""
    import contextlib

    import torch

    from qrobust.tasks.models.diffusion import enable_bidirectional_attention
    from qrobust.tasks.models.loading import library_output_to

    base, quantized = workdir / f"base-{shape.layers}", workdir / f"gptq-{shape.layers}-{bits}"
    build_random_model(shape, device).save_pretrained(base)
    free_device_memory(device)
    examples = calibration_examples(samples, seq_len, shape.vocab)
    with library_output_to(workdir / "gptqmodel.log"), contextlib.chdir(workdir):
        from gptqmodel import GPTQModel, QuantizeConfig

        synchronize(device)
        started = time.perf_counter()
        model = GPTQModel.load(str(base), QuantizeConfig(bits=bits, group_size=group_size, sym=True, desc_act=False),
                               dtype=torch.bfloat16)
        if bidirectional:
            enable_bidirectional_attention(model.model)
        model.quantize(examples)
        model.save(str(quantized))
        synchronize(device)
        seconds = time.perf_counter() - started
    del model
    free_device_memory(device)
    return seconds


def hessian_batch(family: str, batch_size: int, seq_len: int, vocab: int, mask_token_id: int, device: str) -> dict:
    """One calibration batch as the HAWQ stage feeds it (diffusion: masked at varied ratios)."""
    import torch

    from qrobust.tasks.models.diffusion import mask_tokens

    ids = random_prompt(batch_size, seq_len, min(vocab, mask_token_id), "cpu", seed=5)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "diffusion":
        ratios = torch.linspace(0.1, 0.9, batch_size)
        masked, positions = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), ratios, mask_token_id,
                                        torch.Generator().manual_seed(6))
        batch |= {"masked_input_ids": masked, "masked_positions": positions, "mask_ratios": ratios}
    return {name: value.to(device) for name, value in batch.items()}


def time_hutchinson_probe(model, family: str, batch: dict, n_batches: int, device: str) -> float:
    """Seconds of one Hutchinson probe (one Hessian-vector product over `n_batches` batches)."""
    from qrobust.tasks.stages.hessian import ar_loss, diffusion_loss_with_stored_masks
    from qrobust.tasks.numerics.curvature import hutchinson_traces

    loss_fn = diffusion_loss_with_stored_masks(True) if family == "diffusion" else ar_loss
    synchronize(device)
    started = time.perf_counter()
    hutchinson_traces(model, loss_fn, [batch] * n_batches, probes=1, seed=0)
    synchronize(device)
    return time.perf_counter() - started


def hessian_probe_cost(batches_a: int, seconds_a: float, batches_b: int, seconds_b: float) -> dict:
    """Split a probe's time into a per-probe part (drawing the random vectors, set-up) and a
    per-batch part (one forward and two backward passes)."""
    per_batch = (seconds_b - seconds_a) / (batches_b - batches_a)
    return {"per_batch_s": per_batch, "per_probe_overhead_s": seconds_a - batches_a * per_batch}


# --------------------------------------------------------------------------- results file


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "records": {}}


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(results, indent=1, sort_keys=True))
    scratch.replace(path)


def one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def software_versions() -> dict:
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "gptqmodel", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def card_record(device: str, settings: BenchSettings) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "software": software_versions(),
        "matmul_tflops": matmul_tflops(device, settings.matmul_size),
        "copy_bytes_per_s": copy_bandwidth(device, settings.copy_bytes),
        "matmul_size": settings.matmul_size,
    }


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Unit:
    """One configuration: its record key, the weights it needs, and what it measures."""

    key: str
    weights: str | None  # a FORMATS name, "fp32" (Hessian), or None (builds its own)
    measure: Callable[["Runner"], dict]


class Runner:
    """Builds each weight format once, runs the units in order, writes every record as it
    comes, skips recorded ones and stops starting units when the time budget runs out."""

    def __init__(self, shape: ModelShape, settings: BenchSettings, device: str, results_path: Path,
                 workdir: Path, budget_s: float, reserve_s: float, retry_errors: bool = False):
        self.shape, self.settings, self.device = shape, settings, device
        self.results_path, self.workdir, self.retry_errors = results_path, workdir, retry_errors
        self.deadline = time.monotonic() + budget_s - reserve_s
        self.results = load_results(results_path)
        self.model, self.weights, self.weights_record = None, None, {}
        self.unbuildable: dict[str, str] = {}  # weights whose build failed: not tried again this run

    def run(self, units: list[Unit]) -> None:
        self.results["runs"].append(card_record(self.device, self.settings))
        self._save()
        for unit in units:
            if self._already_measured(unit.key):
                continue
            if time.monotonic() > self.deadline:
                print(f"time budget spent; left for the next run: {unit.key}", flush=True)
                continue
            self._run_unit(unit)

    def _already_measured(self, key: str) -> bool:
        record = self.results["records"].get(key)
        return record is not None and not (self.retry_errors and "error" in record)

    def _run_unit(self, unit: Unit) -> None:
        started = time.monotonic()
        try:
            self._load_weights(unit.weights)
            record = {**self.weights_record, **unit.measure(self)} if unit.weights else unit.measure(self)
        except Exception as error:  # recorded, so that one failing kernel leaves the others measured
            record = {"error": one_line(error)}
            self._drop_model()
        record |= {"run": len(self.results["runs"]) - 1, "unit_wall_s": time.monotonic() - started}
        self.results["records"][unit.key] = record
        self._save()
        print(f"{unit.key}: {json.dumps(record, default=str)}", flush=True)

    def _load_weights(self, weights: str | None) -> None:
        if weights == self.weights:
            return
        self._drop_model()
        if weights is None:  # the unit builds its own models
            return
        if weights in self.unbuildable:
            raise RuntimeError(f"{weights} weights failed to build: {self.unbuildable[weights]}")
        try:
            self._build(weights)
        except Exception as error:
            self.unbuildable[weights] = one_line(error)
            raise

    def _build(self, weights: str) -> None:
        if weights == "fp32":
            self.model = build_random_model(self.shape, self.device, "float32")
            self.weights_record = {}
        else:
            self.model, self.weights_record = build_format(self.shape, FORMATS[weights], self.settings, self.device)
        self.weights = weights

    def _drop_model(self) -> None:
        self.model, self.weights, self.weights_record = None, None, {}
        free_device_memory(self.device)

    def _save(self) -> None:
        save_results(self.results, self.results_path)


def build_format(shape: ModelShape, weights: WeightFormat, settings: BenchSettings, device: str):
    """The model in `weights`, and what describes it: kernel, checkpoint and resident bytes."""
    import torch

    started = time.perf_counter()
    # what the process still holds from earlier work; resident and peak figures include it
    baseline = int(torch.cuda.memory_allocated()) if device.startswith("cuda") else 0
    model = build_random_model(shape, device)
    record = {"format": weights.name, "kernel": "torch.nn.Linear (bf16)", "group_size": None,
              "baseline_bytes": baseline}
    if weights.quantized:
        backend = weights.backend_for(device)
        record |= {
            "kernel": replace_linears_with_gptq(model, weights.bits, settings.group_size, backend, device),
            "backend": backend,
            "group_size": settings.group_size,
            "auto_kernel_candidates": auto_kernel_candidates(weights.bits, settings.group_size, device, torch.bfloat16),
        }
    record["state_dict_bytes"] = state_dict_bytes(model)
    record["checkpoint_bytes"] = checkpoint_bytes(shape, weights.bits, settings.group_size)
    if weights.quantized:
        finish_gptq_kernels(model)
    free_device_memory(device)
    synchronize(device)
    record["build_s"] = time.perf_counter() - started
    if device.startswith("cuda"):
        record["resident_bytes"] = int(torch.cuda.memory_allocated())
    return model, record


def benchmark_units(shape: ModelShape, settings: BenchSettings, formats: list[str], parts: list[str],
                    mask_token_id: int) -> list[Unit]:
    """Every configuration in the order a time-limited run should take them: the kernels
    (bf16 first), then the Hessian and GPTQ timings."""
    units = []
    for name in formats:
        for batch in settings.batches:
            if "ar" in parts:
                units.append(Unit(f"ar/{AR_MODEL}/{name}/b{batch}", name,
                                  lambda r, b=batch: measure_ar(r.model, r.shape, b, r.settings, r.device)))
            if "diffusion" in parts:
                units.append(Unit(f"diffusion/{DIFFUSION_MODEL}/{name}/b{batch}", name,
                                  lambda r, b=batch: measure_diffusion(r.model, r.shape, b, r.settings, r.device,
                                                                       mask_token_id)))
    models = ((AR_MODEL, "ar"), (DIFFUSION_MODEL, "diffusion"))
    if "hessian" in parts:
        for model_name, family in models:
            units.extend(_hessian_units(model_name, family, settings, mask_token_id))
    if "gptq" in parts:
        for model_name, family in models:
            units.extend(_gptq_units(model_name, family == "diffusion", settings))
    return units


def _hessian_units(model_name: str, family: str, settings: BenchSettings, mask_token_id: int) -> list[Unit]:
    def measure_points(runner: Runner) -> dict:
        s = runner.settings
        batch = hessian_batch(family, s.hessian_batch_size, s.calibration_seq_len, runner.shape.vocab,
                              mask_token_id, runner.device)
        time_hutchinson_probe(runner.model, family, batch, 1, runner.device)  # warm-up
        low, high = s.hessian_batches
        seconds = {n: time_hutchinson_probe(runner.model, family, batch, n, runner.device) for n in (low, high)}
        return {"probe_s_by_batches": {str(n): t for n, t in seconds.items()},
                "batch_size": s.hessian_batch_size, "seq_len": s.calibration_seq_len,
                **hessian_probe_cost(low, seconds[low], high, seconds[high])}

    return [Unit(f"hessian/{model_name}", "fp32", measure_points)]


def _gptq_units(model_name: str, bidirectional: bool, settings: BenchSettings) -> list[Unit]:
    def measure_layers(layers: int) -> Callable[[Runner], dict]:
        def measure_point(runner: Runner) -> dict:
            s = runner.settings
            _warm_gptq_once(runner)
            seconds = time_gptq_quantization(runner.shape.with_layers(layers), bidirectional, 4, s.group_size,
                                             s.calibration_samples, s.calibration_seq_len, runner.workdir,
                                             runner.device)
            return {"layers": layers, "seconds": seconds, "bits": 4, "group_size": s.group_size,
                    "samples": s.calibration_samples, "seq_len": s.calibration_seq_len}
        return measure_point

    return [Unit(f"gptq/{model_name}/L{layers}", None, measure_layers(layers)) for layers in settings.gptq_layers]


def _warm_gptq_once(runner: Runner) -> None:
    """One throwaway quantization, so one-time start-up costs stay out of the timed points
    (they would bend the line the 28-layer figure is read from)."""
    if getattr(runner, "gptq_warm", False):
        return
    runner._drop_model()
    time_gptq_quantization(runner.shape.with_layers(1), False, 4, runner.settings.group_size, 4, 32,
                           runner.workdir, runner.device)
    runner.gptq_warm = True


# --------------------------------------------------------------------------- the report


def summarize(results: dict, shape: ModelShape, settings: BenchSettings) -> dict:
    """The derived figures: floors, target ratios and the extrapolations."""
    records, runs = results["records"], results["runs"]
    summary = {"decode_floor": {}, "diffusion_rate": {}, "gptq": {}, "hessian": {}}
    for key, record in records.items():
        if "error" in record:
            continue
        card = runs[record["run"]]
        kind, model_name, *rest = key.split("/")
        if kind == "ar":
            floor = bandwidth_floor_seconds(record["checkpoint_bytes"], card["copy_bytes_per_s"])
            summary["decode_floor"][key] = {"floor_s": floor, "ratio": record["decode_best_s"] / floor}
        elif kind == "diffusion":
            summary["diffusion_rate"][key] = diffusion_rates(record, card["matmul_tflops"])
    for model_name in (AR_MODEL, DIFFUSION_MODEL):
        points = [records.get(f"gptq/{model_name}/L{layers}") for layers in settings.gptq_layers]
        if all(p and "error" not in p for p in points):
            (a, b) = points
            summary["gptq"][model_name] = extrapolate_linearly(a["layers"], a["seconds"], b["layers"], b["seconds"],
                                                               shape.layers)
        hessian = records.get(f"hessian/{model_name}")
        if hessian and "error" not in hessian:
            batches = math.ceil(settings.calibration_samples / hessian["batch_size"])
            per_probe = hessian["per_probe_overhead_s"] + batches * hessian["per_batch_s"]
            summary["hessian"][model_name] = {"batches": batches, "per_probe_s": per_probe,
                                              "max_probes_s": per_probe * settings.hutchinson_probes}
    return summary


def diffusion_rates(record: dict, matmul_tflops: float) -> dict:
    """Forward rates as fractions of the card's matmul rate: the full-window forward, and the
    forward the sampler runs (lm_head on the answer only) where it was measured; `target` is
    the sampler's where present."""
    rates = {"fraction_of_matmul": record["forward_tflops"] / matmul_tflops}
    if record.get("answer_forward_tflops"):
        rates["answer_fraction_of_matmul"] = record["answer_forward_tflops"] / matmul_tflops
    rates["target"] = rates.get("answer_fraction_of_matmul", rates["fraction_of_matmul"])
    return rates


def render_markdown(results: dict, shape: ModelShape, settings: BenchSettings, command: str) -> str:
    summary = summarize(results, shape, settings)
    records = results["records"]
    lines = ["# GPU benchmarks: Qwen3-1.7B (AR) and CoDA-1.7B (diffusion)", ""]
    lines += _card_section(results["runs"], command)
    lines += _formats_section(records)
    lines += _ar_section(records, summary)
    lines += _diffusion_section(records, summary, settings)
    lines += _before_after_section(results.get("before", {}), records, results["runs"])
    lines += _targets_section(records, summary)
    lines += _relative_section(records)
    lines += _one_off_section(records, summary, settings, shape)
    lines += _repeat_section(records, results.get("superseded", {}))
    lines += _errors_section(records)
    lines += _notes_section(results.get("notes", []))
    lines += _conventions_section(settings)
    lines += _raw_section(results)
    return "\n".join(lines) + "\n"


def _card_section(runs: list[dict], command: str) -> list[str]:
    lines = ["## Card and software", "",
             "| run | device | date | bf16 matmul TFLOP/s | copy GB/s (read+write) | software |",
             "| --- | --- | --- | --- | --- | --- |"]
    for index, run in enumerate(runs):
        software = ", ".join(f"{k} {v}" for k, v in run["software"].items())
        lines.append(f"| {index} | {run['device']} | {run['date']} | {run['matmul_tflops']:.0f} | "
                     f"{run['copy_bytes_per_s'] / 1e9:.0f} | {software} |")
    return lines + ["", "Each record is compared with the card figures of its own run. Reproduce on the GPU "
                    "machine, from the repository root, with gptqmodel 7.6.0 installed (on a machine without a "
                    "package index: wheels of gptqmodel, defuser, device-smi, logbar, tokenicer, dill, "
                    "multiprocess, datasets, pypcre 0.6.4 and torchao 0.18.0, installed with `pip install "
                    "--no-index --no-deps --target /tmp/site` and put on `PYTHONPATH`). A run given an existing results file measures only "
                    "what it lacks; `--budget-s` stops starting configurations after that many seconds.",
                    "", "```", command, "```", ""]


def _formats_section(records: dict) -> list[str]:
    lines = ["## Weight formats", "",
             "| format | kernel | group size | checkpoint GB | resident GB | build s | gptqmodel AUTO candidates |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for record in records.values():
        if "format" not in record or record["format"] in seen:
            continue
        seen.add(record["format"])
        candidates = ", ".join(record.get("auto_kernel_candidates", [])) or "-"
        lines.append(f"| {record['format']} | {record['kernel']} | {record['group_size'] or '-'} | "
                     f"{_gb(record['checkpoint_bytes'])} | {_net_gb(record, 'resident_bytes')} | "
                     f"{record['build_s']:.1f} | {candidates} |")
    return lines + ["", "Build s: random weights, kernel modules and gptqmodel's post-load step; the first "
                    "quantized build of a process includes gptqmodel's one-time start-up, and the first Marlin "
                    "build on a machine includes compiling its CUDA kernels.", ""]


def _ar_section(records: dict, summary: dict) -> list[str]:
    lines = [f"## {AR_MODEL}: auto-regressive prefill and decode", "",
             "| format | batch | prefill ms | prefill tok/s | decode ms/token eager | decode ms/token CUDA graph "
             "| floor ms | best / floor | peak GB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in records.items():
        if not key.startswith("ar/") or "error" in r:
            continue
        floor = summary["decode_floor"][key]
        graph = _ms(r["decode_graph_s"]) if r.get("decode_graph_s") else _graph_failure(r)
        lines.append(f"| {r['format']} | {_batch(key)} | {_ms(r['prefill_s'])} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{_ms(r['decode_eager_s'])} | {graph} | {_ms(floor['floor_s'])} | {floor['ratio']:.2f} | "
                     f"{_net_gb(r, 'peak_bytes')} |")
    return lines + [""]


def _graph_failure(record: dict) -> str:
    return f"failed: {record.get('decode_graph_error', '?')}".replace("|", "/")


def _diffusion_section(records: dict, summary: dict, settings: BenchSettings) -> list[str]:
    lines = [f"## {DIFFUSION_MODEL}: denoising steps", "",
             f"Prompt {settings.prompt_tokens} tokens + answer window {settings.answer_tokens} tokens; sampler "
             f"settings temperature {settings.temperature}, top_p {settings.top_p}, alg {settings.alg}. "
             f"Steps were timed over {settings.measured_steps} steps of the pipeline's `diffusion_generate` "
             f"(median of {settings.repeats} runs) and multiplied by the forward passes of the study's "
             f"{settings.diffusion_steps}-step schedule: answer seconds are **extrapolated**, not run in full. "
             "Full forward: `diffusion_logits` at the whole window (logits at every position). Sampler forward: "
             "`diffusion_logits_at` as the sampler runs it (lm_head on the answer window only); its TFLOP/s count "
             "only those logits. Records without sampler-forward figures predate it (see their run).", "",
             "| format | batch | run | full forward ms | % of matmul | sampler forward ms | % of matmul | step ms "
             "| answer s (extrap.) | answer tok/s | full forward peak GB | sampler forward peak GB | step peak GB |",
             "| --- " * 13 + "|"]
    for key, r in records.items():
        if not key.startswith("diffusion/") or "error" in r:
            continue
        rates = summary["diffusion_rate"][key]
        answer_rate = rates.get("answer_fraction_of_matmul")
        lines.append(f"| {r['format']} | {_batch(key)} | {r['run']} | {_ms(r['forward_s'])} | "
                     f"{_percent(rates['fraction_of_matmul'])} | {_ms(r.get('answer_forward_s'))} | "
                     f"{_percent(answer_rate)} | {_ms(r['step_s'])} | {r['answer_s_extrapolated']:.1f} | "
                     f"{r['answer_tokens_per_s']:.1f} | {_net_gb(r, 'forward_peak_bytes')} | "
                     f"{_net_gb(r, 'answer_forward_peak_bytes')} | {_net_gb(r, 'peak_bytes')} |")
    return lines + [""]


BEFORE_AFTER_METRICS = (("forward_s", "full forward ms", 1e3), ("answer_forward_s", "sampler forward ms", 1e3),
                        ("step_s", "step ms", 1e3), ("peak_bytes", "step peak GB", 1e-9))


def _before_after_section(before: dict, records: dict, runs: list[dict]) -> list[str]:
    """Diffusion figures measured before the sampler changes (kept under "before") beside
    the same configurations measured again; the sampler forward did not exist before, so
    its before is the full forward the sampler then ran."""
    rows = []
    for key, old in before.items():
        new = records.get(key)
        if not new or "error" in new:
            continue
        for field, label, scale in BEFORE_AFTER_METRICS:
            old_value = old.get(field, old["forward_s"] if field == "answer_forward_s" else None)
            old_value = old_value - old.get("baseline_bytes", 0) if field == "peak_bytes" else old_value
            new_value = new[field] - new.get("baseline_bytes", 0) if field == "peak_bytes" else new.get(field)
            if old_value and new_value:
                rows.append(f"| {key} | {label} | {old_value * scale:.2f} (run {old['run']}) | "
                            f"{new_value * scale:.2f} (run {new['run']}) | {old_value / new_value:.2f}x |")
    if not rows:
        return []
    devices = sorted({runs[r["run"]]["device"] for r in (*before.values(), *records.values()) if "run" in r})
    return [f"## {DIFFUSION_MODEL}: before and after the sampler changes", "",
            "Before: the sampler took full-window logits from `diffusion_logits` (explicit 4-D mask) and scored "
            "every answer position over the whole vocabulary in float32. After: logits only at the positions "
            "still masked (`diffusion_logits_at`), no mask when nothing is padded, scoring in chunks and on the "
            f"top-p candidates. Cards: {', '.join(devices)}. Change: before / after (above 1 is better).", "",
            "| configuration | metric | before | after | change |", "| --- | --- | --- | --- | --- |", *rows, ""]


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _targets_section(records: dict, summary: dict) -> list[str]:
    largest = f"/b{max(_batches(records))}"
    lines = ["## Targets", "", "| target | configuration | measured | goal | met |", "| --- | --- | --- | --- | --- |"]
    for key, value in summary["diffusion_rate"].items():
        if key.endswith(largest):
            which = "sampler forward" if "answer_fraction_of_matmul" in value else "full forward"
            lines.append(f"| diffusion forward rate ({which}) | {key} | {100 * value['target']:.0f}% of matmul "
                         f"| >= 50% | {_yes(value['target'] >= 0.5)} |")
    for key, value in summary["decode_floor"].items():
        if key.endswith("/b1"):
            lines.append(f"| AR decode vs its own bandwidth floor | {key} | {value['ratio']:.2f}x | <= 3x | "
                         f"{_yes(value['ratio'] <= 3)} |")
    return lines + [""]


RELATIVE_COLUMNS = (("ar", 1, "decode_best_s", "AR decode b1"), ("ar", 32, "decode_best_s", "AR decode b32"),
                    ("diffusion", 1, "step_s", "diffusion step b1"), ("diffusion", 32, "step_s", "diffusion step b32"))


def _relative_section(records: dict) -> list[str]:
    """Each format's speed against bf16 (bf16 time / format time: above 1 is faster)."""
    formats = sorted({r["format"] for r in records.values() if "format" in r} - {"bf16"})
    header = " | ".join(label for *_, label in RELATIVE_COLUMNS)
    lines = ["## Against bf16", "", "Speed relative to bf16 (bf16 time / this format's time; above 1 is faster) "
             "and checkpoint size relative to bf16; '-' where the two were measured with different samplers.", "",
             f"| format | checkpoint | {header} |", "| --- " * (len(RELATIVE_COLUMNS) + 2) + "|"]
    for name in formats:
        cells = [_relative(records, kind, batch, metric, name) for kind, batch, metric, _ in RELATIVE_COLUMNS]
        size = _ratio(records, f"ar/{AR_MODEL}/{name}/b1", f"ar/{AR_MODEL}/bf16/b1", "checkpoint_bytes")
        lines.append(f"| {name} | {size} | {' | '.join(cells)} |")
    return lines + [""]


def _relative(records: dict, kind: str, batch: int, metric: str, name: str) -> str:
    model_name = AR_MODEL if kind == "ar" else DIFFUSION_MODEL
    bf16, other = f"{kind}/{model_name}/bf16/b{batch}", f"{kind}/{model_name}/{name}/b{batch}"
    if _sampler_era(records.get(bf16, {})) != _sampler_era(records.get(other, {})):
        return "-"  # steps of two different samplers
    return _ratio(records, bf16, other, metric, suffix="x")


def _sampler_era(record: dict) -> bool:
    """Whether a record was measured with the sampler that reads logits only where it scores."""
    return "answer_forward_s" in record


def _ratio(records: dict, numerator: str, denominator: str, field: str, suffix: str = "") -> str:
    top, bottom = records.get(numerator, {}).get(field), records.get(denominator, {}).get(field)
    return f"{top / bottom:.2f}{suffix}" if top and bottom else "-"


def _notes_section(notes: list[str]) -> list[str]:
    return ["## Notes", "", *[f"- {note}" for note in notes], ""] if notes else []


def _raw_section(results: dict) -> list[str]:
    return ["", "<details><summary>Raw results (the JSON a run resumes from)</summary>", "", "```json",
            json.dumps(results, indent=1, sort_keys=True), "```", "", "</details>"]


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def _batches(records: dict) -> list[int]:
    return [_batch(key) for key in records if key.startswith(("ar/", "diffusion/"))] or [1]


def _batch(key: str) -> int:
    return int(key.rsplit("/b", 1)[1])


def _one_off_section(records: dict, summary: dict, settings: BenchSettings, shape: ModelShape) -> list[str]:
    lines = ["## Quantization and Hessian time", ""]
    for model_name, seconds in summary["gptq"].items():
        points = ", ".join(f"{records[f'gptq/{model_name}/L{n}']['seconds']:.1f} s at {n} layers"
                           for n in settings.gptq_layers)
        lines.append(f"- GPTQ 4-bit, {model_name}, {settings.calibration_samples} samples x "
                     f"{settings.calibration_seq_len} tokens, group size {settings.group_size}: measured {points}; "
                     f"**{seconds:.0f} s extrapolated to {shape.layers} layers** (a straight line through the two "
                     "points; load + quantize + save, as the pipeline's quantize stage times it).")
    for model_name, value in summary["hessian"].items():
        record = records[f"hessian/{model_name}"]
        lines.append(f"- Hutchinson Hessian traces, {model_name} (fp32, all {shape.layers} layers): "
                     f"{record['per_batch_s']:.2f} s per batch of {record['batch_size']} x {record['seq_len']} "
                     f"tokens plus {record['per_probe_overhead_s']:.1f} s per probe; **{value['per_probe_s']:.0f} s "
                     f"per probe** at {settings.calibration_samples} samples ({value['batches']} batches, "
                     f"extrapolated from {settings.hessian_batches[0]} and {settings.hessian_batches[1]} batches); "
                     f"{value['max_probes_s'] / 60:.0f} min at the default {settings.hutchinson_probes} probes.")
    return lines + [""]


REPEATED_METRICS = ("prefill_s", "decode_eager_s", "decode_graph_s", "forward_s", "step_s")


def _repeat_section(records: dict, superseded: dict) -> list[str]:
    """Timings measured twice (a configuration measured again on another machine of the same kind)."""
    rows = []
    for key, old in superseded.items():
        new = records.get(key, {})
        for metric in REPEATED_METRICS:
            if old.get(metric) and new.get(metric):
                change = 100 * (new[metric] / old[metric] - 1)
                rows.append(f"| {key} | {metric} | {_ms(old[metric])} | {_ms(new[metric])} | {change:+.0f}% |")
    if not rows:
        return []
    reason = next(iter(superseded.values())).get("superseded_because", "")
    return ["## Repeatability", "", f"Measured twice (first run superseded: {reason}). Times in ms.", "",
            "| configuration | metric | first | second | change |", "| --- | --- | --- | --- | --- |", *rows, ""]


def _errors_section(records: dict) -> list[str]:
    failed = {key: r["error"] for key, r in records.items() if "error" in r}
    if not failed:
        return []
    return ["## Not measured", ""] + [f"- {key}: {error}" for key, error in failed.items()] + [""]


def _conventions_section(settings: BenchSettings) -> list[str]:
    return [
        "## Conventions", "",
        "- Random weights at the real shapes (speed does not depend on weight values). Quantized models use "
        "gptqmodel's inference kernels with random packed weights; checkpoint bytes are those of the GPTQ "
        "format gptqmodel saves (decoder Linears quantized; embedding, lm_head and norms bf16).",
        "- Timings: CUDA events, warm-up first, medians. Peak memory: `qrobust.tasks.runtime.measure.measure` "
        "(the allocator's peak over the block, model weights included). Resident and peak figures are net of "
        "what the process held before the format was built (`baseline_bytes`); * marks a baseline inferred, "
        "not measured (see the record's `baseline_inferred`).",
        "- Copy bandwidth counts bytes read plus bytes written; the decode floor is checkpoint bytes / that "
        "figure, i.e. reading every saved weight once at the copy rate. The embedding table is counted "
        "although a decode step reads only B of its rows, so this floor sits above the strict one.",
        "- Forward FLOPs: 2 x (decoder Linear + lm_head parameters) x tokens + attention 4 x layers x heads x "
        "head_dim x query/key pairs (all pairs for the bidirectional diffusion model).",
        f"- Decode: greedy, static KV cache of {static_cache_length(settings)} slots, sdpa attention over all "
        "slots with a mask; the CUDA graph replays one whole step (forward, argmax, cache update).",
    ]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _gb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.2f}"


def _net_gb(record: dict, field: str) -> str:
    """A memory figure less what the process held before the build; * when that was inferred."""
    if record.get(field) is None:
        return "-"
    net = record[field] - record.get("baseline_bytes", 0)
    return f"{net / 1e9:.2f}{'*' if 'baseline_inferred' in record and record['baseline_bytes'] else ''}"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qrobust.tools.gpu_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--results", type=Path, required=True, help="results JSON (read, resumed and written)")
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="real")
    parser.add_argument("--device", default=None, help="default: cuda when present")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--parts", default="ar,diffusion,hessian,gptq")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no configuration after this")
    parser.add_argument("--reserve-s", type=float, default=0.0, help="leave this much of the budget unused")
    parser.add_argument("--retry-errors", action="store_true", help="measure again what failed before")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qrobust-speed"))
    return parser.parse_args(argv)


def settings_for(shape_name: str) -> BenchSettings:
    return TINY_SETTINGS if shape_name == "tiny" else BenchSettings()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shape, settings = SHAPES[args.shape], settings_for(args.shape)
    mask_token_id = CODA_MASK_TOKEN_ID if args.shape == "real" else shape.vocab - 1
    if args.command == "run":
        from qrobust.tasks.models.loading import default_device

        import_gptqmodel_before_any_model()
        formats = [f for f in args.formats.split(",") if f]
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise SystemExit(f"unknown format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
        args.workdir.mkdir(parents=True, exist_ok=True)
        runner = Runner(shape, settings, args.device or default_device(), args.results, args.workdir,
                        args.budget_s, args.reserve_s, args.retry_errors)
        runner.run(benchmark_units(shape, settings, formats, args.parts.split(","), mask_token_id))
    results = load_results(args.results)
    if args.markdown:
        args.markdown.write_text(render_markdown(results, shape, settings, reproduce_command(args)))
        print(f"wrote {args.markdown}")


def import_gptqmodel_before_any_model() -> None:
    """gptqmodel keeps, in a module global, an import error raised while it first loads;
    its traceback holds every frame then on the stack, with their locals. Imported later,
    from a function holding a model, it would keep that model resident for good."""
    import gptqmodel  # noqa: F401


def reproduce_command(args: argparse.Namespace) -> str:
    return (f"python -m qrobust.tools.gpu_speed run --results {args.results.name} --markdown docs/gpu-benchmarks.md "
            f"--shape {args.shape} --formats {args.formats} --parts {args.parts}")


if __name__ == "__main__":
    main()
