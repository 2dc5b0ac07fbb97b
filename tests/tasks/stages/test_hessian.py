import pytest

from qrobust.tasks.config import MethodSpec
from qrobust.tasks.stages.hessian import allocate, compute_layer_traces, read_traces
from qrobust.tasks.stages.quantize import average_bits, quantize_model, quantized_module_bits


@pytest.fixture(scope="module")
def calibrations(stdlib_calibration, tiny_models, shared_workspace):
    from qrobust.tasks.stages.calibration import build_calibration

    return {name: build_calibration(stdlib_calibration, m, shared_workspace) for name, m in tiny_models.items()}


@pytest.mark.parametrize("model", ["tiny-ar", "tiny-diffusion"])
@pytest.mark.parametrize("budget", [2.5, 3.5])
def test_hawq_checkpoint_has_exactly_the_allocated_bits_within_budget(model, budget, tiny_models, calibrations,
                                                                    shared_workspace):
    method = MethodSpec("hawq", budget=budget, probes=8, estimator="activation")
    traces = compute_layer_traces(tiny_models[model], method, calibrations[model], shared_workspace)
    allocation = allocate(tiny_models[model], method, traces, shared_workspace)
    checkpoint = quantize_model(tiny_models[model], method, calibrations[model], shared_workspace, allocation)
    assert quantized_module_bits(checkpoint["path"]) == allocation["bits"]
    assert average_bits(checkpoint["path"]) <= budget + 1e-9
    assert checkpoint["avg_bits"] == pytest.approx(allocation["avg_bits"])


def test_every_budget_of_a_model_reuses_one_trace_artifact(tiny_models, calibrations, shared_workspace):
    first = compute_layer_traces(tiny_models["tiny-ar"], MethodSpec("hawq", budget=2.5, estimator="activation"),
                                 calibrations["tiny-ar"], shared_workspace)
    second = compute_layer_traces(tiny_models["tiny-ar"], MethodSpec("hawq", budget=3.5, estimator="activation"),
                                  calibrations["tiny-ar"], shared_workspace)
    assert first["key"] == second["key"]


def test_diffusion_traces_use_the_denoising_loss_and_differ_from_the_ar_ones(tiny_grid, tiny_models, calibrations,
                                                                            shared_workspace):
    method = MethodSpec("hawq", budget=3.0, probes=4, trace_tolerance=None)
    ar = read_traces(compute_layer_traces(tiny_models["tiny-ar"], method, calibrations["tiny-ar"], shared_workspace))
    diffusion = read_traces(compute_layer_traces(tiny_models["tiny-diffusion"], method,
                                                 calibrations["tiny-diffusion"], shared_workspace))
    layers = tiny_grid.models[0].tiny.num_hidden_layers
    assert set(ar) == set(diffusion) and len(ar) == 7 * layers  # q, k, v, o, gate, up, down per layer
    assert any(abs(ar[n]["trace"] - diffusion[n]["trace"]) > 1e-6 for n in ar)
    assert all(t["probes"] == 4 and t["trace_stderr"] >= 0 for t in diffusion.values())
