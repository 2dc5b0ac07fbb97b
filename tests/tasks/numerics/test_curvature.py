import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from qrobust.tasks.numerics.curvature import LayerTrace, activation_traces, hutchinson_traces, quantizable_linears

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_qwen3(layers=1, hidden=8, init=0.3, attn="eager", seed=0):
    torch.manual_seed(seed)
    config = Qwen3Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=hidden // 2, vocab_size=16, max_position_embeddings=32,
        initializer_range=init, attn_implementation=attn, tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).float()


def next_token_loss(model, input_ids):
    logits = model(input_ids=input_ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )


def token_batches(count, seed=1, shape=(4, 8)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, shape, generator=generator) for _ in range(count)]


def exact_layer_traces(model, loss_fn, batches):
    """Per-layer traces of the full Hessian, formed explicitly through
    torch.func (independent of the estimator's own double backward)."""
    linears = quantizable_linears(model)
    names = list(linears)
    shapes = [linears[n].weight.shape for n in names]
    sizes = [linears[n].weight.numel() for n in names]

    def mean_loss(flat):
        params = {f"{n}.weight": part.view(s) for n, part, s in zip(names, torch.split(flat, sizes), shapes)}

        def functional_model(**kwargs):
            return torch.func.functional_call(model, params, (), kwargs)

        return sum(loss_fn(functional_model, b) for b in batches) / len(batches)

    flat = torch.cat([linears[n].weight.detach().flatten() for n in names])
    hessian = torch.autograd.functional.hessian(mean_loss, flat, vectorize=True).double()
    blocks = torch.split(torch.diagonal(hessian), sizes)
    owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    return hessian, owner, names, {n: float(d.sum()) for n, d in zip(names, blocks)}


def rademacher_stderr(hessian, owner, layer_index, probes):
    """Standard error of the mean of `probes` Hutchinson draws for one block:
    v_l^T (Hv)_l - tr(H_ll) = sum over pairs i<j of v_i v_j H_ij ([i in l] + [j in l])."""
    inside = (owner == layer_index).double()
    weighted = hessian * (inside[:, None] + inside[None, :])
    off_diagonal = weighted - torch.diag(torch.diagonal(weighted))
    variance = float(off_diagonal.pow(2).sum()) / 2
    return math.sqrt(variance / probes)


@pytest.fixture(scope="module")
def exact_case():
    model = tiny_qwen3()
    batches = token_batches(2, shape=(2, 8))
    hessian, owner, names, exact = exact_layer_traces(model, next_token_loss, batches)
    estimate = hutchinson_traces(model, next_token_loss, batches, probes=300, seed=0)
    return model, batches, hessian, owner, names, exact, estimate


def test_quantizable_linears_are_the_decoder_projections_gptq_quantizes():
    model = tiny_qwen3(layers=2)
    names = list(quantizable_linears(model))
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    modules = dict(model.named_modules())
    assert all(quantizable_linears(model)[n] is modules[n] for n in names)


def test_hutchinson_estimate_is_within_three_standard_errors_of_the_exact_trace(exact_case):
    _, _, _, _, names, exact, estimate = exact_case
    for name in names:
        assert estimate[name].probes == 300
        assert abs(estimate[name].trace_mean - exact[name]) < 3 * estimate[name].trace_stderr, name
    # The check has teeth: most blocks' traces are several standard errors away from zero.
    assert sum(abs(exact[n]) > 3 * estimate[n].trace_stderr for n in names) >= 4


def test_reported_standard_error_matches_rademacher_theory(exact_case):
    _, _, hessian, owner, names, _, estimate = exact_case
    for index, name in enumerate(names):
        ratio = estimate[name].trace_stderr / rademacher_stderr(hessian, owner, index, probes=300)
        assert 0.75 < ratio < 1.33, (name, ratio)


def test_standard_error_shrinks_with_more_probes(exact_case):
    model, batches, _, _, names, _, many = exact_case
    few = hutchinson_traces(model, next_token_loss, batches, probes=16, seed=0)
    for name in names:
        assert many[name].trace_stderr < 0.5 * few[name].trace_stderr, name


def test_layer_trace_reports_parameter_counts(exact_case):
    model, _, _, _, names, _, estimate = exact_case
    modules = dict(model.named_modules())
    assert {n: estimate[n].n_params for n in names} == {n: modules[n].weight.numel() for n in names}
    assert all(isinstance(t, LayerTrace) and t.name == n for n, t in estimate.items())


def test_same_seed_gives_identical_traces_and_another_seed_differs():
    model, batches = tiny_qwen3(), token_batches(2)
    first = hutchinson_traces(model, next_token_loss, batches, probes=8, seed=7)
    again = hutchinson_traces(model, next_token_loss, batches, probes=8, seed=7)
    other = hutchinson_traces(model, next_token_loss, batches, probes=8, seed=8)
    assert first == again
    assert all(first[n].trace_mean != other[n].trace_mean for n in first)


def test_early_stop_leaves_every_layer_within_tolerance():
    model, batches = tiny_qwen3(), token_batches(1)
    traces = hutchinson_traces(model, next_token_loss, batches, probes=400, tolerance=0.5, seed=0, min_probes=8)
    probes = {t.probes for t in traces.values()}
    assert len(probes) == 1
    assert 8 <= probes.pop() < 400
    assert all(t.relative_stderr < 0.5 for t in traces.values())


def test_loose_tolerance_still_runs_min_probes():
    model, batches = tiny_qwen3(), token_batches(1)
    traces = hutchinson_traces(model, next_token_loss, batches, probes=50, tolerance=1e9, seed=0, min_probes=5)
    assert {t.probes for t in traces.values()} == {5}


def squared_weight_loss(model, batch):
    """Any callable works as the loss: this one ignores the inputs and has the
    diagonal Hessian 2 c_l I on each block, so tr(H_ll) = 2 c_l n_l."""
    return sum(c * linear.weight.pow(2).sum() for c, linear in zip(batch, quantizable_linears(model).values()))


def test_diagonal_hessian_is_recovered_exactly_with_zero_error():
    model = tiny_qwen3(layers=2)
    coefficients = [0.5 * (i + 1) for i in range(14)]
    traces = hutchinson_traces(model, squared_weight_loss, [coefficients], probes=30, tolerance=0.01, seed=3,
                               min_probes=4)
    for c, trace in zip(coefficients, traces.values()):
        assert trace.trace_mean == pytest.approx(2 * c * trace.n_params, rel=1e-6)
        assert trace.trace_stderr == pytest.approx(0.0, abs=1e-6 * trace.trace_mean)
        assert trace.probes == 4


def test_a_layer_the_loss_does_not_reach_has_zero_trace():
    model = tiny_qwen3()
    first_six = [1.0] * 6  # the loss leaves out the last projection, down_proj
    traces = hutchinson_traces(model, squared_weight_loss, [first_six], probes=3, seed=0)
    assert traces["model.layers.0.mlp.down_proj"].trace_mean == 0.0
    assert traces["model.layers.0.mlp.up_proj"].trace_mean == pytest.approx(2 * 16 * 8)


def test_model_state_is_restored_after_estimation():
    model = tiny_qwen3(attn="sdpa")
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    hutchinson_traces(model, next_token_loss, token_batches(1), probes=2, seed=0, min_probes=2)
    assert model.config._attn_implementation == "sdpa"
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_non_float32_weights_are_refused():
    model = tiny_qwen3().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has dtype torch\.bfloat16"):
        hutchinson_traces(model, next_token_loss, token_batches(1), probes=8, seed=0)


def run_forward(model, input_ids):
    model(input_ids=input_ids)


def test_activation_trace_equals_hand_computation():
    model, batches = tiny_qwen3(layers=2, hidden=16), token_batches(2, shape=(3, 5))
    traces = activation_traces(model, batches, run_forward)

    layer = model.model.layers[0]
    per_batch = []
    with torch.no_grad():
        for ids in batches:
            x = layer.input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 16).double()
            per_batch.append(2 * (x.T @ x).trace().item() / x.shape[0])
    q_rows, k_rows = layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features
    q = traces["model.layers.0.self_attn.q_proj"]
    k = traces["model.layers.0.self_attn.k_proj"]
    assert q.trace_mean == pytest.approx(q_rows * sum(per_batch) / 2, rel=1e-6)
    assert k.trace_mean == pytest.approx(k_rows * sum(per_batch) / 2, rel=1e-6)
    assert q.trace_stderr == pytest.approx(q_rows * abs(per_batch[0] - per_batch[1]) / 2, rel=1e-6)
    assert q.probes == 2 and q.n_params == layer.self_attn.q_proj.weight.numel()
    assert set(traces) == set(quantizable_linears(model))


def test_activation_traces_leave_no_hooks_behind():
    model = tiny_qwen3(layers=2, hidden=16)
    activation_traces(model, token_batches(1), run_forward)
    assert all(not m._forward_pre_hooks for m in quantizable_linears(model).values())


def test_fisher_trace_is_the_mean_squared_per_row_gradient_norm():
    import torch

    from qrobust.tasks.numerics.curvature import fisher_traces

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("model", torch.nn.Module())
    model.model.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    layer = model.model.layers[0]
    layer.add_module("mlp", torch.nn.Module())
    layer.mlp.add_module("up_proj", torch.nn.Linear(3, 2, bias=False))

    def loss_fn(m, batch):
        return (m.model.layers[0].mlp.up_proj(batch["x"]) ** 2).sum()

    x = torch.randn(4, 3)
    traces = fisher_traces(model, loss_fn, [{"x": x[:2]}, {"x": x[2:]}])
    weight = layer.mlp.up_proj.weight.detach()
    # d/dW sum((W x)^2) = 2 (W x) x^T for one row x
    expected = [float((2 * torch.outer(weight @ row, row)).pow(2).sum()) for row in x]
    trace = traces["model.layers.0.mlp.up_proj"]
    assert trace.trace_mean == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert trace.probes == 4 and trace.trace_stderr > 0
