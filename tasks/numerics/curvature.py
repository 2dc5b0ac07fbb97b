"""Per-layer curvature for HAWQ-style mixed precision.

HAWQ (v2/v3) ranks a layer's sensitivity to quantization by the trace of the
loss Hessian restricted to that layer's weights, divided by its parameter
count. This module estimates those traces; `qrobust.tasks.numerics.bit_allocation` turns them into
bit-widths.

What is computed
----------------
For every quantizable decoder Linear l (the modules GPTQ quantizes), with W_l
its weight and L the mean of `loss_fn` over the calibration batches:

    tr(H_ll),   H_ll = d^2 L / dW_l^2   (the diagonal block of the full Hessian)

by Hutchinson's estimator: for Rademacher v drawn jointly over all layers,
E[v_l^T (H v)_l] = tr(H_ll), so one Hessian-vector product per probe yields
an estimate for every layer at once.

Auto-regressive models: L is next-token cross-entropy on clean calibration
text (logits at position i score token i + 1).

Diffusion models (the "modified HAWQ"): the model never sees clean text at
inference, so curvature measured on clean text would describe the wrong
operating point. L is instead the masked-denoising loss the model was trained
on: for each calibration sequence a mask ratio t is drawn (uniformly over
(0, 1]), each token of the sequence (of the answer, for prompt/answer pairs) is
replaced by the mask token with probability t, the model runs with
bidirectional attention, and the loss is the cross-entropy on the masked
positions only (weighted by 1/t, as the training objective weights it), using
the logits exactly as the model's sampler uses them (shifted right by one for
CoDA / Dream: the logits at position i - 1 score token i; unshifted for
LLaDA). The caller supplies that loss as `loss_fn`; this module only
differentiates it. Masks drawn once and stored in the batches make the traces
reproducible and the standard error pure probe noise; masks drawn afresh inside
`loss_fn` estimate the Hessian of the loss averaged over masks, with the mask
noise folded into the standard error (each probe's two derivatives always see
the same mask, since they differentiate one evaluation of the loss).

`activation_traces` is the cheap alternative GPTQ itself implies: the trace of
the layer-wise Hessian of ||W X - W' X||^2 / N, which needs forward passes only.

Caller obligations
------------------
- Weights must be float32 (second derivatives in bf16 are noise).
- Attention must support double backward. PyTorch's CPU SDPA kernel does not;
  `hutchinson_traces` switches a transformers model to eager attention for the
  duration of the call and restores the previous choice. Remote-code models
  that cannot switch must be loaded with `attn_implementation="eager"`.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import torch

# The projections GPTQ quantizes in a Llama/Qwen3-style decoder layer (the
# `module_tree` of gptqmodel's Qwen3 definition); embeddings, norms and lm_head
# stay in full precision. CoDA and Dream use the same names.
_QUANTIZABLE_NAME = re.compile(
    r"(?:^|\.)layers\.\d+\."
    r"(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)$"
)


@dataclass(frozen=True)
class LayerTrace:
    """Estimated trace of one layer's Hessian block.

    `trace_mean` is the estimate of tr(H_ll) over all `n_params` weights of the
    layer; `trace_stderr` its standard error over `probes` independent draws
    (Hutchinson probes, or calibration batches for activation traces).
    """

    name: str
    n_params: int
    trace_mean: float
    trace_stderr: float
    probes: int

    @property
    def relative_stderr(self) -> float:
        if self.trace_stderr == 0.0:
            return 0.0
        if self.trace_mean == 0.0:
            return math.inf
        return self.trace_stderr / abs(self.trace_mean)


def quantizable_linears(model) -> dict[str, torch.nn.Linear]:
    """Decoder-layer Linear modules that GPTQ quantizes, keyed by their
    `model.named_modules()` name (e.g. `model.layers.0.self_attn.q_proj`)."""
    import torch

    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _QUANTIZABLE_NAME.search(name)
    }
    if not linears:
        raise ValueError(
            f"no quantizable Linear found in {type(model).__name__}: expected names ending in "
            "layers.<i>.self_attn.{q,k,v,o}_proj or layers.<i>.mlp.{gate,up,down}_proj"
        )
    return linears


def rademacher_like(tensor, generator):
    """A tensor of independent +-1 entries shaped like `tensor`, drawn on the CPU
    so that a seed gives the same probes on every device."""
    import torch

    signs = torch.randint(0, 2, tensor.shape, generator=generator, dtype=torch.int8)
    return (signs.to(torch.float32) * 2 - 1).to(device=tensor.device, dtype=tensor.dtype)


def hessian_vector_product(model, loss_fn, batches: Sequence, params: list, vector: list) -> list:
    """(H v) for H the Hessian of the mean of `loss_fn` over `batches` with
    respect to `params`, by double backward: H v = d(g . v)/dw with g = dL/dw."""
    import torch

    product = [torch.zeros_like(p) for p in params]
    for batch in batches:
        loss = loss_fn(model, batch)
        # materialize_grads: a layer the loss does not reach has zero curvature, not an error.
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        grad_dot_v = sum((g * v).sum() for g, v in zip(grads, vector))
        batch_product = torch.autograd.grad(grad_dot_v, params, materialize_grads=True)
        for total, part in zip(product, batch_product):
            total.add_(part, alpha=1.0 / len(batches))
    return product


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error; the error is infinite for one value."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.inf
    variance = math.fsum((x - mean) ** 2 for x in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _every_layer_converged(estimates: dict, tolerance: float) -> bool:
    for values in estimates.values():
        mean, stderr = mean_and_stderr(values)
        if stderr == 0.0:
            continue
        if mean == 0.0 or stderr / abs(mean) >= tolerance:
            return False
    return True


@contextlib.contextmanager
def _only_these_require_grad(model, params: list):
    # Gradients of every other parameter would cost memory and time for nothing.
    previous = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(previous[id(p)])


@contextlib.contextmanager
def _eager_attention(model):
    # PyTorch's fused CPU attention kernel has no second derivative.
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
        if model.config._attn_implementation != "eager":
            raise ValueError(
                f"{type(model).__name__} keeps attention implementation {previous!r}, which has no "
                "double backward; load it with attn_implementation='eager'"
            )
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _require_float32(linears: dict) -> None:
    import torch

    for name, linear in linears.items():
        if linear.weight.dtype != torch.float32:
            raise ValueError(
                f"{name} has dtype {linear.weight.dtype}; Hessian traces need torch.float32 weights"
            )


# The fewest Hutchinson probes whose spread judges a trace tolerance.
MIN_PROBES = 8


def hutchinson_traces(
    model,
    loss_fn: Callable[[Any, Any], Any],
    batches: Sequence,
    probes: int,
    tolerance: float | None = None,
    seed: int = 0,
    min_probes: int = MIN_PROBES,
) -> dict[str, LayerTrace]:
    """Hutchinson estimates of tr(H_ll) for every quantizable Linear's weight.

    H is the Hessian of mean(loss_fn(model, b) for b in batches). Each probe
    costs one Hessian-vector product over all batches (a forward and two
    backward passes per batch). Stops after `probes` probes, or, with a
    `tolerance`, as soon as at least `min_probes` have run and every layer's
    relative standard error (stderr / |mean|) is below it. The standard error
    is infinite after a single probe.

    The model is put in eval mode and, for transformers models, switched to
    eager attention for the call; both, and every parameter's requires_grad,
    are restored afterwards.
    """
    import torch

    if not batches:
        raise ValueError("batches is empty; need at least one calibration batch")
    if probes < 1:
        raise ValueError(f"probes={probes}; need at least 1")
    if tolerance is not None:
        if not tolerance > 0:
            raise ValueError(f"tolerance={tolerance}; must be positive or None")
        if min_probes < 2:
            raise ValueError(f"min_probes={min_probes}; need at least 2 to judge a standard error")
        if probes < min_probes:
            raise ValueError(f"probes={probes} is below min_probes={min_probes}")

    linears = quantizable_linears(model)
    _require_float32(linears)
    names = list(linears)
    params = [linears[name].weight for name in names]
    generator = torch.Generator().manual_seed(seed)
    estimates: dict[str, list[float]] = {name: [] for name in names}

    with _eval_mode(model), _eager_attention(model), _only_these_require_grad(model, params), \
            torch.enable_grad():
        for done in range(1, probes + 1):
            vector = [rademacher_like(p, generator) for p in params]
            product = hessian_vector_product(model, loss_fn, batches, params, vector)
            for name, v, hv in zip(names, vector, product):
                estimates[name].append(float(torch.dot(v.flatten(), hv.flatten())))
            if tolerance is not None and done >= min_probes and _every_layer_converged(estimates, tolerance):
                break

    return {name: _layer_trace(name, linears[name].weight.numel(), values) for name, values in estimates.items()}


def fisher_traces(model, loss_fn: Callable[[Any, Any], Any], batches: Sequence) -> dict[str, LayerTrace]:
    """Traces of the empirical Fisher, E_x ||d loss(x) / dW_l||^2, per quantizable Linear.

    The Fisher is the Gauss-Newton approximation of the loss Hessian: positive
    semi-definite everywhere, where the Hessian itself is indefinite whenever the
    calibration loss is not at a minimum (then Hutchinson traces come out negative and
    say nothing about which layers matter). x runs over the rows of every batch (each
    row's loss taken alone); the standard error is that of the mean over rows.
    """
    import torch

    if not batches:
        raise ValueError("batches is empty; need at least one calibration batch")
    linears = quantizable_linears(model)
    _require_float32(linears)
    names = list(linears)
    params = [linears[name].weight for name in names]
    estimates: dict[str, list[float]] = {name: [] for name in names}
    with _eval_mode(model), _only_these_require_grad(model, params), torch.enable_grad():
        for batch in batches:
            for row in _rows_of(batch):
                grads = torch.autograd.grad(loss_fn(model, row), params, allow_unused=True)
                for name, grad in zip(names, grads):
                    estimates[name].append(0.0 if grad is None else float(grad.pow(2).sum()))
    return {name: _layer_trace(name, linears[name].weight.numel(), values) for name, values in estimates.items()}


def _rows_of(batch) -> list:
    """Single-row batches of a dict-of-tensors batch (other batch types: one row each)."""
    if not isinstance(batch, dict):
        return [batch]
    size = next(iter(batch.values())).shape[0]
    return [{key: value[index : index + 1] for key, value in batch.items()} for index in range(size)]


def _layer_trace(name: str, n_params: int, values: Sequence[float]) -> LayerTrace:
    mean, stderr = mean_and_stderr(values)
    return LayerTrace(name=name, n_params=n_params, trace_mean=mean, trace_stderr=stderr, probes=len(values))


def activation_traces(
    model,
    batches: Iterable,
    forward_fn: Callable[[Any, Any], Any],
) -> dict[str, LayerTrace]:
    """Trace of GPTQ's layer-wise Hessian for every quantizable Linear.

    GPTQ minimises ||W X - W' X||_F^2 / N for a layer with inputs X (columns =
    the N calibration tokens). Its Hessian per output row is 2 X X^T / N, so
    over the whole weight it is (2 X X^T / N) kron I_out, whose trace,
    out_features * tr(2 X X^T / N), is what `trace_mean` holds: like a
    Hutchinson trace it covers all n_params weights, so trace / n_params is the
    mean diagonal curvature in both. The mean is over all tokens of all batches
    (padding included, as the caller's forward feeds it); the standard error
    comes from the spread of the per-batch estimates.

    `forward_fn(model, batch)` runs one forward pass; its result is ignored.
    """
    import torch

    linears = quantizable_linears(model)
    sum_squares = {name: [] for name in linears}
    tokens = {name: [] for name in linears}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float64)
            sum_squares[name][-1] += float(x.pow(2).sum())
            tokens[name][-1] += x.shape[0]
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches:
                for name in linears:
                    sum_squares[name].append(0.0)
                    tokens[name].append(0)
                forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()

    if not next(iter(tokens.values())):
        raise ValueError("batches is empty; need at least one calibration batch")
    return {
        name: _activation_trace(name, linear, sum_squares[name], tokens[name])
        for name, linear in linears.items()
    }


def _activation_trace(name: str, linear, sum_squares: list[float], tokens: list[int]) -> LayerTrace:
    if 0 in tokens:
        raise ValueError(f"{name} saw no input in calibration batch {tokens.index(0)}; forward_fn must run the model")
    rows = linear.out_features
    per_batch = [rows * 2.0 * s / n for s, n in zip(sum_squares, tokens)]
    _, stderr = mean_and_stderr(per_batch)
    mean = rows * 2.0 * math.fsum(sum_squares) / sum(tokens)
    return LayerTrace(name=name, n_params=linear.weight.numel(), trace_mean=mean, trace_stderr=stderr,
                      probes=len(per_batch))
