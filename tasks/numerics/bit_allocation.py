"""HAWQ-style bit allocation: layer sensitivities and an exact integer program.

Sensitivity of layer l at b bits (HAWQ-v2/v3):

    S_l(b) = (tr(H_ll) / n_l) * ||W_l - Q_b(W_l)||_F^2

where Q_b is the group-wise round-to-nearest grid GPTQ itself quantizes onto,
so the error is the one the chosen bits will cost before GPTQ's error
compensation. `allocate_bits` minimises sum_l S_l(b_l) subject to the average
bits per weight staying within a budget, exactly (mixed-integer program solved
by HiGHS through scipy). `dynamic_map` turns the result into gptqmodel's
per-module `QuantizeConfig(dynamic=...)` overrides.
"""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction
from typing import Mapping, Sequence

# Widths the GPTQ grid and gptqmodel's packing accept.
ALLOWED_BITS = range(2, 9)
TIE_POLICIES = ("none", "qkv", "qkv+gate_up")
# HiGHS's default tolerances (1e-7, 1e-6) let it call a point optimal that is
# worse by ~1e-7 of the largest sensitivity; these are its tightest settings.
_TIGHT_TOLERANCES = {
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "mip_feasibility_tolerance": 1e-10,
}


def _check_bits(bits, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{what}={bits!r}; allowed: integers {ALLOWED_BITS.start}..{ALLOWED_BITS.stop - 1}")


def _check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size={group_size!r}; allowed: -1 (one group per row) or a positive integer")


def _grid_scale_and_zero(low, high, maxq: int, sym: bool):
    """Scale and zero point of gptqmodel's min/max quantizer (`Quantizer.find_params` with
    perchannel=True, mse=0) from each group's minimum and maximum, op for op so that float32
    results agree bit for bit. Works on any shape of groups."""
    import torch

    zeros = torch.zeros_like(low)
    # The range always contains 0, so a zero weight is exactly representable.
    xmin = torch.minimum(low, zeros)
    xmax = torch.maximum(high, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    all_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(all_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(all_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        # gptqmodel centres the symmetric grid at (maxq + 1) / 2, not maxq / 2:
        # the code range is [-2^(b-1), 2^(b-1) - 1] times scale.
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.unsqueeze(-1), zero.unsqueeze(-1)


def _groups(weight, group_size: int):
    """The weight as float32 groups [out, n_groups, width] on its own device (the last group of a
    row may be shorter when the width does not divide it: then a list of such blocks)."""
    import torch

    w = weight.detach().to(dtype=torch.float32)
    width = w.shape[1] if group_size == -1 else group_size
    if w.shape[1] % width == 0:
        return [w.reshape(w.shape[0], -1, width)]
    return [block.unsqueeze(1) for block in torch.split(w, width, dim=1)]


def _dequantized_groups(groups, bits: int, sym: bool):
    import torch

    maxq = 2**bits - 1
    out = []
    for block in groups:
        scale, zero = _grid_scale_and_zero(block.amin(dim=-1), block.amax(dim=-1), maxq, sym)
        codes = torch.clamp(torch.round(block / scale) + zero, 0, maxq)
        out.append(scale * (codes - zero))
    return out


def group_quantize(weight, bits: int, group_size: int, sym: bool = True):
    """Round-to-nearest `weight` (out_features x in_features) onto GPTQ's grid
    and dequantize: for every row and every run of `group_size` input columns
    (the last run may be shorter; -1 = the whole row), min/max scale and zero
    point, codes in [0, 2^bits - 1]. gptqmodel's default is sym=True.

    Returns a float32 tensor shaped like `weight`, on its device.
    """
    import torch

    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (out_features, in_features)")
    _check_group_size(group_size)
    blocks = _dequantized_groups(_groups(weight, group_size), bits, sym)
    return torch.cat([block.reshape(weight.shape[0], -1) for block in blocks], dim=1)


def quantization_error(weight, bits: int, group_size: int, sym: bool = True) -> float:
    """||W - Q_b(W)||_F^2 for GPTQ's round-to-nearest grid."""
    return quantization_errors(weight, (bits,), group_size, sym)[bits]


def quantization_errors(weight, bits_options: Sequence[int], group_size: int, sym: bool = True) -> dict[int, float]:
    """||W - Q_b(W)||_F^2 for every width b at once, on the weight's device (a GPU makes a 1.7B
    model's 196 modules x 4 widths take seconds)."""
    import torch

    _check_group_size(group_size)
    groups = _groups(weight, group_size)
    errors = {}
    for bits in bits_options:
        _check_bits(bits)
        dequantized = _dequantized_groups(groups, bits, sym)
        errors[bits] = float(sum((g.to(torch.float64) - d.to(torch.float64)).pow(2).sum()
                                 for g, d in zip(groups, dequantized)))
    return errors


def layer_sensitivities(
    traces: Mapping,
    weights: Mapping,
    bits_options: Sequence[int] = (2, 3, 4, 8),
    group_size: int = 128,
    sym: bool = True,
) -> dict[str, dict[int, float]]:
    """S_l(b) = (trace_l / n_l) * ||W_l - Q_b(W_l)||^2 for every layer and width.

    `traces` maps names to `qrobust.tasks.numerics.curvature.LayerTrace`; `weights` the same names
    to weight tensors. A negative trace estimate (Hutchinson noise, or a model
    away from a minimum) carries no usable ranking, so it counts as zero
    curvature.
    """
    if not bits_options:
        raise ValueError("bits_options is empty; offer at least one width")
    for bits in bits_options:
        _check_bits(bits, "bits option")
    if set(traces) != set(weights):
        missing = sorted(set(traces) ^ set(weights))
        raise ValueError(f"traces and weights name different layers: {missing[:5]}")
    sensitivities = {}
    for name, trace in traces.items():
        weight = weights[name]
        if trace.n_params != weight.numel():
            raise ValueError(f"{name}: trace covers {trace.n_params} weights but the weight has {weight.numel()}")
        curvature = max(trace.trace_mean, 0.0) / trace.n_params
        errors = quantization_errors(weight, sorted(bits_options), group_size, sym)
        sensitivities[name] = {bits: curvature * errors[bits] for bits in sorted(bits_options)}
    return sensitivities


def average_bits(bits: Mapping[str, int], n_params: Mapping[str, int]) -> float:
    """Weight-count-weighted mean bit-width."""
    total = sum(n_params[name] for name in bits)
    if total <= 0:
        raise ValueError(f"total parameter count is {total}; need a positive count")
    return sum(b * n_params[name] for name, b in bits.items()) / total


def tie_groups_for(module_names: Sequence[str], policy: str) -> list[list[str]]:
    """Groups of modules that must share one width.

    "qkv": q/k/v_proj of each attention block (they read the same input, and
    fused-QKV kernels need one width); "qkv+gate_up": also gate/up_proj of each
    MLP. Groups keep the order of `module_names`.
    """
    if policy not in TIE_POLICIES:
        raise ValueError(f"tie policy {policy!r}; allowed: {', '.join(TIE_POLICIES)}")
    patterns = []
    if policy in ("qkv", "qkv+gate_up"):
        patterns.append(re.compile(r"^(.*\.self_attn)\.(?:q|k|v)_proj$"))
    if policy == "qkv+gate_up":
        patterns.append(re.compile(r"^(.*\.mlp)\.(?:gate|up)_proj$"))
    groups: dict[str, list[str]] = {}
    for name in module_names:
        for pattern in patterns:
            match = pattern.match(name)
            if match:
                groups.setdefault(match.group(1), []).append(name)
    return list(groups.values())


def _partition(names: Sequence[str], tie_groups) -> list[list[str]]:
    """Every module in exactly one group: the tie groups, then singletons."""
    known = set(names)
    seen: set[str] = set()
    groups = []
    for group in tie_groups or []:
        for name in group:
            if name not in known:
                raise ValueError(f"tie group member {name!r} has no sensitivity")
            if name in seen:
                raise ValueError(f"{name!r} appears in more than one tie group")
            seen.add(name)
        if group:
            groups.append(list(group))
    groups.extend([name] for name in names if name not in seen)
    return groups


def _shared_options(group: list[str], sensitivity) -> list[int]:
    options = set.intersection(*(set(sensitivity[name]) for name in group))
    if not options:
        raise ValueError(f"tie group {group} has no bit-width offered to all its members")
    return sorted(options)


def allocate_bits(
    sensitivity: Mapping[str, Mapping[int, float]],
    n_params: Mapping[str, int],
    budget_bits: float,
    tie_groups: list[list[str]] | None = None,
) -> dict[str, int]:
    """Widths minimising total sensitivity with average bits <= `budget_bits`.

    Exact: binary x[g, b] per (tie group, offered width), one width per group,
    sum n_g * b * x[g, b] <= budget_bits * sum n, solved by HiGHS with zero
    optimality gap (to ~1e-10 of the largest sensitivity, its tightest
    tolerance). The budget itself is enforced in exact integer arithmetic.
    Modules in no tie group choose alone; a tie group chooses among the widths
    offered to all its members.
    """
    import numpy as np
    from scipy.optimize import LinearConstraint, milp

    names = list(sensitivity)
    if not names:
        raise ValueError("sensitivity is empty; nothing to allocate")
    for name in names:
        if n_params.get(name, 0) <= 0:
            raise ValueError(f"{name}: parameter count {n_params.get(name)!r}; need a positive count")
        for bits, value in sensitivity[name].items():
            _check_bits(bits, f"{name} bit option")
            if not math.isfinite(value):
                raise ValueError(f"{name}: sensitivity at {bits} bits is {value}; must be finite")
    if not math.isfinite(budget_bits):
        raise ValueError(f"budget_bits={budget_bits}; must be a finite number of bits per weight")

    groups = _partition(names, tie_groups)
    options = [_shared_options(group, sensitivity) for group in groups]
    group_sizes = [sum(n_params[name] for name in group) for group in groups]
    total = sum(group_sizes)
    # Integers throughout, so "within budget" is decided exactly, not to solver tolerance.
    limit = math.floor(Fraction(budget_bits) * total)
    minimum = sum(size * min(opts) for size, opts in zip(group_sizes, options))
    if minimum > limit:
        raise ValueError(
            f"budget of {budget_bits} bits/weight is infeasible: the minimum achievable is "
            f"{minimum / total:.6g} bits/weight (every module at its lowest offered width)"
        )

    columns = [(g, bits) for g, opts in enumerate(options) for bits in opts]
    cost = np.array([sum(sensitivity[name][bits] for name in groups[g]) for g, bits in columns], dtype=float)
    cost = _well_scaled(cost, [g for g, _ in columns])
    usage = [group_sizes[g] * bits for g, bits in columns]
    # Dividing by the common factor keeps the coefficients small integers, so the
    # solver's feasibility tolerance cannot admit a point over the budget.
    unit = math.gcd(*usage)
    one_hot = np.zeros((len(groups), len(columns)))
    for j, (g, _) in enumerate(columns):
        one_hot[g, j] = 1.0
    constraints = [
        LinearConstraint(one_hot, 1, 1),
        LinearConstraint(np.array([[u // unit for u in usage]], dtype=float), -np.inf, limit // unit),
    ]
    with warnings.catch_warnings():
        # scipy passes these HiGHS options through verbatim but warns that it does not know them.
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        result = milp(cost, integrality=np.ones(len(columns)), bounds=(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, **_TIGHT_TOLERANCES})
    if not result.success:
        raise RuntimeError(f"bit allocation failed: {result.message}")

    chosen = {}
    for g, group in enumerate(groups):
        picks = [j for j, (owner, _) in enumerate(columns) if owner == g]
        bits = columns[max(picks, key=lambda j: result.x[j])][1]
        chosen.update({name: bits for name in group})
    used = sum(bits * n_params[name] for name, bits in chosen.items())
    if used > limit:
        raise RuntimeError(f"solver returned {used / total:.6g} bits/weight, over the budget of {budget_bits}")
    return {name: chosen[name] for name in names}


def _well_scaled(cost, owners):
    """Subtract each group's cheapest option and divide by the largest entry:
    the argmin is unchanged (each group takes exactly one option) and the
    solver sees numbers of order one whatever the scale of the traces."""
    import numpy as np

    cost = cost.copy()
    owners = np.array(owners)
    for g in np.unique(owners):
        cost[owners == g] -= cost[owners == g].min()
    largest = np.abs(cost).max()
    return cost / largest if largest > 0 else cost


def dynamic_map(bits: Mapping[str, int], default_bits: int) -> dict[str, dict]:
    """gptqmodel `QuantizeConfig(dynamic=...)` overrides for an allocation.

    One `+:^<escaped full module name>$` key per module whose width differs
    from `default_bits` (the config's `bits`, which covers the rest). Names are
    full `named_modules()` paths, `model.` prefix included, which is what
    gptqmodel matches against; an anchored, fully escaped name is treated by
    gptqmodel as an exact-name lookup, so no module can match another's key.
    """
    _check_bits(default_bits, "default_bits")
    overrides = {}
    for name, b in bits.items():
        _check_bits(b, f"bits for {name}")
        if b != default_bits:
            overrides[f"+:^{re.escape(name)}$"] = {"bits": b}
    return overrides
