import itertools
import json
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.tasks.numerics.bit_allocation import (
    allocate_bits,
    average_bits,
    dynamic_map,
    group_quantize,
    layer_sensitivities,
    quantization_error,
    tie_groups_for,
)
from qrobust.tasks.numerics.curvature import LayerTrace

# gptqmodel on a 2-core CPU: a worker count it can honour, no C++ pack build, no torch.compile.
for key, value in {"GPTQMODEL_CPU_WORKERS": "2", "GPTQMODEL_DISABLE_PACK_EXT": "1", "TORCHDYNAMO_DISABLE": "1"}.items():
    os.environ.setdefault(key, value)

BIT_OPTIONS = (2, 3, 4, 8)
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def module_names(layers):
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS]


# ---------------------------------------------------------------- RTN grid

def weight_with_awkward_rows(rows=12, columns=80, seed=0):
    """Random weights plus the rows where min/max grids differ: all zero,
    all positive, all negative."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    weight[0] = weight[0].abs()
    weight[1] = 0.0
    weight[2] = -weight[2].abs()
    return weight


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("bits", BIT_OPTIONS)
def test_rtn_grid_equals_gptqmodels_own_rtn_bit_for_bit(bits, group_size, sym):
    from gptqmodel.quantization.config import RTNConfig
    from gptqmodel.quantization.rtn import RTN

    linear = torch.nn.Linear(80, 12, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight_with_awkward_rows())
    theirs = RTN(linear, RTNConfig(bits=bits, group_size=group_size, sym=sym)).quantize()[0]
    assert torch.equal(group_quantize(linear.weight, bits, group_size, sym), theirs)


def test_rtn_grid_equals_gptqmodels_quantizer_as_gptq_configures_it():
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    weight = weight_with_awkward_rows(rows=6, columns=64, seed=1)
    config = QuantizeConfig(bits=3, group_size=32)  # gptqmodel's defaults otherwise: sym=True, mse=0
    assert config.sym is True
    quantizer = Quantizer(qcfg=config)
    quantizer.configure(perchannel=True)
    groups = []
    for block in torch.split(weight, 32, dim=1):
        quantizer.find_params(block, weight=True)
        groups.append(quantizer.quantize(block))
    assert torch.equal(group_quantize(weight, 3, 32), torch.cat(groups, dim=1))


def test_symmetric_grid_of_a_nonnegative_row_reaches_only_half_its_range():
    # gptqmodel keeps xmin = 0 here but still centres the codes at (maxq + 1) / 2,
    # so 2-bit codes {0..3} map to {-2, -1, 0, 1} * scale with scale = 3 / 3.
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert group_quantize(weight, 2, -1, sym=True).tolist() == [[0.0, 1.0, 1.0, 1.0]]
    assert quantization_error(weight, 2, -1, sym=True) == 5.0
    assert quantization_error(weight, 2, -1, sym=False) == 0.0


def test_quantization_error_is_the_squared_frobenius_residual():
    weight = weight_with_awkward_rows()
    residual = (weight - group_quantize(weight, 3, 32)).double()
    assert quantization_error(weight, 3, 32) == pytest.approx(float(residual.pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("bits, group_size", [(1, 32), (9, 32), (4, 0), (4, -2)])
def test_bad_bits_or_group_size_are_refused(bits, group_size):
    with pytest.raises(ValueError, match="allowed"):
        group_quantize(torch.ones(2, 4), bits, group_size)


# ---------------------------------------------------------------- sensitivities

def test_sensitivity_is_mean_curvature_times_quantization_error():
    weights = {"a": weight_with_awkward_rows(4, 64, seed=2), "b": weight_with_awkward_rows(8, 64, seed=3)}
    traces = {
        "a": LayerTrace("a", 256, trace_mean=12.0, trace_stderr=1.0, probes=10),
        "b": LayerTrace("b", 512, trace_mean=-3.0, trace_stderr=1.0, probes=10),
    }
    sensitivity = layer_sensitivities(traces, weights, bits_options=(2, 4), group_size=32)
    assert sensitivity["a"] == {b: pytest.approx(12.0 / 256 * quantization_error(weights["a"], b, 32)) for b in (2, 4)}
    assert sensitivity["b"] == {2: 0.0, 4: 0.0}


def test_sensitivities_refuse_a_trace_of_another_size():
    traces = {"a": LayerTrace("a", 10, 1.0, 0.1, 8)}
    with pytest.raises(ValueError, match="a: trace covers 10 weights but the weight has 16"):
        layer_sensitivities(traces, {"a": torch.ones(4, 4)}, group_size=-1)


# ---------------------------------------------------------------- allocation

# HiGHS works in doubles with tolerances of 1e-10 on costs scaled to at most 1:
# "optimal" means optimal up to this fraction of the largest sensitivity.
SOLVER_SLACK = 1e-8


def largest(sensitivity):
    return max(max(by_bits.values()) for by_bits in sensitivity.values())


def total_sensitivity(sensitivity, bits):
    return sum(sensitivity[name][b] for name, b in bits.items())


def fits(bits, n_params, budget):
    return sum(b * n_params[name] for name, b in bits.items()) <= Fraction(budget) * sum(n_params.values())


def brute_force_optimum(sensitivity, n_params, budget, tie_groups):
    names = list(sensitivity)
    best = None
    for choice in itertools.product(*(sorted(sensitivity[n]) for n in names)):
        bits = dict(zip(names, choice))
        if any(len({bits[n] for n in group}) > 1 for group in tie_groups):
            continue
        if fits(bits, n_params, budget):
            total = total_sensitivity(sensitivity, bits)
            best = total if best is None else min(best, total)
    return best


@st.composite
def instances(draw, max_layers=6):
    count = draw(st.integers(1, max_layers))
    names = [f"l{i}" for i in range(count)]
    sensitivity = {
        n: {b: draw(st.floats(0.0, 1e3, allow_subnormal=False)) for b in BIT_OPTIONS} for n in names
    }
    n_params = {n: draw(st.integers(1, 5000)) for n in names}
    return sensitivity, n_params


@st.composite
def budgets(draw, n_params):
    # Half the time exactly the average of some allocation: the boundary case.
    if draw(st.booleans()):
        bits = {n: draw(st.sampled_from(BIT_OPTIONS)) for n in n_params}
        return average_bits(bits, n_params)
    return draw(st.floats(2.0, 8.0))


@st.composite
def tie_partitions(draw, names):
    labels = [draw(st.integers(0, 2)) for _ in names]
    groups = [[n for n, label in zip(names, labels) if label == g] for g in range(3)]
    return [g for g in groups if len(g) > 1]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_allocation_is_optimal_against_brute_force(data):
    sensitivity, n_params = data.draw(instances())
    budget = data.draw(budgets(n_params))
    ties = data.draw(tie_partitions(list(sensitivity)))
    bits = allocate_bits(sensitivity, n_params, budget, tie_groups=ties)
    best = brute_force_optimum(sensitivity, n_params, budget, ties)
    assert fits(bits, n_params, budget)
    assert total_sensitivity(sensitivity, bits) <= best + SOLVER_SLACK * largest(sensitivity)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_budget_is_never_exceeded(data):
    sensitivity, n_params = data.draw(instances(max_layers=40))
    budget = data.draw(budgets(n_params))
    bits = allocate_bits(sensitivity, n_params, budget)
    assert fits(bits, n_params, budget)
    assert set(bits) == set(sensitivity) and all(b in BIT_OPTIONS for b in bits.values())


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_larger_budget_never_gives_a_larger_optimal_total(data):
    sensitivity, n_params = data.draw(instances())
    low = data.draw(budgets(n_params))
    high = data.draw(st.floats(low, 8.0))
    at_low = total_sensitivity(sensitivity, allocate_bits(sensitivity, n_params, low))
    at_high = total_sensitivity(sensitivity, allocate_bits(sensitivity, n_params, high))
    assert at_high <= at_low + SOLVER_SLACK * largest(sensitivity)


def test_ample_budget_gives_every_layer_its_least_sensitive_width():
    sensitivity = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 3.0, 4: 2.0, 8: 0.5}}
    assert allocate_bits(sensitivity, {"a": 10, "b": 10}, 8.0) == {"a": 8, "b": 8}


def test_tight_budget_gives_the_bits_to_the_more_sensitive_layer():
    sensitivity = {"flat": {2: 1.0, 4: 0.5}, "sharp": {2: 100.0, 4: 1.0}}
    assert allocate_bits(sensitivity, {"flat": 64, "sharp": 64}, 3.0) == {"flat": 2, "sharp": 4}


def test_tied_modules_share_one_width():
    names = module_names(2)
    generator = torch.Generator().manual_seed(4)
    sensitivity = {n: {b: float(torch.rand(1, generator=generator)) * 2.0 ** -b for b in BIT_OPTIONS} for n in names}
    n_params = {n: 64 * 64 for n in names}
    ties = tie_groups_for(names, "qkv+gate_up")
    bits = allocate_bits(sensitivity, n_params, 3.3, tie_groups=ties)
    assert all(len({bits[n] for n in group}) == 1 for group in ties)
    assert len(set(bits.values())) > 1
    assert average_bits(bits, n_params) <= 3.3


def test_infeasible_budget_names_budget_and_minimum():
    sensitivity = {"a": {2: 1.0, 4: 0.0}, "b": {3: 1.0, 4: 0.0}}
    with pytest.raises(ValueError, match=r"^budget of 2\.25 bits/weight is infeasible: the minimum achievable is "
                                         r"2\.5 bits/weight"):
        allocate_bits(sensitivity, {"a": 100, "b": 100}, 2.25)


def test_budget_exactly_at_the_minimum_is_feasible():
    sensitivity = {"a": {2: 1.0, 4: 0.0}, "b": {2: 1.0, 4: 0.0}}
    assert allocate_bits(sensitivity, {"a": 7, "b": 9}, 2.0) == {"a": 2, "b": 2}


def test_a_module_in_two_tie_groups_is_refused():
    sensitivity = {n: {2: 0.0, 4: 0.0} for n in "abc"}
    with pytest.raises(ValueError, match="'b' appears in more than one tie group"):
        allocate_bits(sensitivity, dict.fromkeys("abc", 1), 4.0, tie_groups=[["a", "b"], ["b", "c"]])


def test_non_finite_sensitivity_is_refused():
    with pytest.raises(ValueError, match="b: sensitivity at 4 bits is nan; must be finite"):
        allocate_bits({"a": {4: 0.0}, "b": {4: float("nan")}}, {"a": 1, "b": 1}, 4.0)


def test_average_bits_weights_by_parameter_count():
    assert average_bits({"a": 2, "b": 8}, {"a": 300, "b": 100}) == 3.5


# ---------------------------------------------------------------- tie groups

def test_qkv_policy_ties_each_attention_blocks_q_k_v():
    assert tie_groups_for(module_names(2), "qkv") == [
        [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)
    ]


def test_qkv_gate_up_policy_also_ties_each_mlps_gate_and_up():
    groups = tie_groups_for(module_names(1), "qkv+gate_up")
    assert groups == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
    ]


def test_none_policy_ties_nothing_and_unknown_policy_is_refused():
    assert tie_groups_for(module_names(2), "none") == []
    with pytest.raises(ValueError, match="tie policy 'qkvo'; allowed: none, qkv, qkv\\+gate_up"):
        tie_groups_for(module_names(1), "qkvo")


# ---------------------------------------------------------------- gptqmodel dynamic map

def test_dynamic_map_keys_are_anchored_escaped_names_of_non_default_modules():
    bits = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 4}
    assert dynamic_map(bits, default_bits=4) == {r"+:^model\.layers\.0\.self_attn\.q_proj$": {"bits": 2}}


def test_gptqmodel_resolves_each_module_to_exactly_its_allocated_bits():
    from gptqmodel import QuantizeConfig

    names = module_names(12)
    bits = {n: BIT_OPTIONS[i % 4] for i, n in enumerate(names)}
    config = QuantizeConfig(bits=4, group_size=32, dynamic=dynamic_map(bits, default_bits=4))
    # Twelve layers, so that layers.1 and layers.10-11 are all present.
    assert {n: config.dynamic_get(n, "bits", config.bits) for n in names} == bits


def test_quantized_checkpoint_carries_the_allocated_bits(tmp_path, monkeypatch):
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors import safe_open
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=64,
                         tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "fp")
    names = module_names(2)
    bits = dict(zip(names, [2, 2, 2, 8, 3, 3, 4, 8, 8, 8, 2, 4, 4, 3]))
    dynamic = dynamic_map(bits, default_bits=4)

    monkeypatch.chdir(tmp_path)  # gptqmodel writes per-run logs into ./logs
    model = GPTQModel.from_pretrained(str(tmp_path / "fp"), QuantizeConfig(bits=4, group_size=32, dynamic=dynamic))
    generator = torch.Generator().manual_seed(1)
    model.quantize([{"input_ids": torch.randint(0, 256, (1, 32), generator=generator),
                     "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(4)])
    model.save(str(tmp_path / "q"))

    saved = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert saved["dynamic"] == dynamic and saved["bits"] == 4
    modules = dict(Qwen3ForCausalLM(config).named_modules())
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as tensors:
        # GPTQ packs each input column's code into `bits` of 32-bit words: qweight is (in * bits / 32, out).
        packed = {n: tensors.get_slice(f"{n}.qweight").get_shape()[0] for n in names}
    assert {n: packed[n] * 32 // modules[n].in_features for n in names} == bits
