import pytest

from qrobust.tasks.methods.hawq import HAWQ
from qrobust.tasks.stages import allocation as allocation_stage
from qrobust.tasks.stages import calibration as calibration_stage
from qrobust.tasks.stages import hessian as hessian_stage
from qrobust.tasks.stages import quantize as quantize_stage
from qrobust.tasks.stages.quantize import average_bits, quantized_module_bits


@pytest.fixture(scope="module")
def calibrations(stdlib_calibration, tiny_models, shared_workspace):
    return {name: calibration_stage.STAGE.run(shared_workspace, (stdlib_calibration, m))
            for name, m in tiny_models.items()}


def traces_for(model, method, calibration, workspace):
    return hessian_stage.STAGE.run(workspace, (model, method.curvature, calibration))


@pytest.mark.parametrize("model", ["tiny-ar", "tiny-diffusion"])
@pytest.mark.parametrize("budget", [2.5, 3.5])
def test_hawq_checkpoint_has_exactly_the_allocated_bits_within_budget(model, budget, tiny_models, calibrations,
                                                                    shared_workspace):
    method = HAWQ(budget=budget, probes=8, estimator="activation")
    traces = traces_for(tiny_models[model], method, calibrations[model], shared_workspace)
    allocation = allocation_stage.STAGE.run(shared_workspace, (tiny_models[model], method, traces))
    checkpoint = quantize_stage.STAGE.run(shared_workspace, (tiny_models[model], method, calibrations[model],
                                                             allocation))
    directory = checkpoint.directory(shared_workspace)
    assert quantized_module_bits(directory) == allocation.bits
    assert average_bits(directory) <= budget + 1e-9
    assert checkpoint.avg_bits == pytest.approx(allocation.avg_bits)


def test_every_budget_of_a_model_reuses_one_trace_artifact(tiny_models, calibrations, shared_workspace):
    first = traces_for(tiny_models["tiny-ar"], HAWQ(budget=2.5, estimator="activation"), calibrations["tiny-ar"],
                       shared_workspace)
    second = traces_for(tiny_models["tiny-ar"], HAWQ(budget=3.5, estimator="activation"), calibrations["tiny-ar"],
                        shared_workspace)
    assert first.key == second.key and second.run.cached


def test_diffusion_traces_use_the_denoising_loss_and_differ_from_the_ar_ones(tiny_grid, tiny_models, calibrations,
                                                                            shared_workspace):
    method = HAWQ(budget=3.0, probes=4, trace_tolerance=None)
    ar = hessian_stage.read_traces(traces_for(tiny_models["tiny-ar"], method, calibrations["tiny-ar"],
                                              shared_workspace), shared_workspace)
    diffusion = hessian_stage.read_traces(traces_for(tiny_models["tiny-diffusion"], method,
                                                     calibrations["tiny-diffusion"], shared_workspace),
                                          shared_workspace)
    layers = tiny_grid.models[0].tiny.num_hidden_layers
    assert set(ar) == set(diffusion) and len(ar) == 7 * layers  # q, k, v, o, gate, up, down per layer
    assert any(abs(ar[n]["trace"] - diffusion[n]["trace"]) > 1e-6 for n in ar)
    assert all(t["probes"] == 4 and t["trace_stderr"] >= 0 for t in diffusion.values())
