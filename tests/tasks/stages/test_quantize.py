import pytest
import torch

from qrobust.tasks.methods.gptaq import GPTAQ
from qrobust.tasks.methods.gptq import GPTQ
from qrobust.tasks.methods.rtn import RTN
from qrobust.tasks.stages import calibration as calibration_stage
from qrobust.tasks.stages.quantize import STAGE, average_bits, quantized_module_bits

METHODS = {"gptq": GPTQ, "rtn": RTN, "gptaq": GPTAQ}


@pytest.fixture(scope="module")
def calibration(stdlib_calibration, tiny_models, shared_workspace):
    return calibration_stage.STAGE.run(shared_workspace, (stdlib_calibration, tiny_models["tiny-ar"]))


def quantize(model, method, calibration, workspace):
    return STAGE.run(workspace, (model, method, calibration if method.needs_calibration else None, None))


def _dequantized_weight(model, name):
    module = model.get_submodule(name)
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight().T.float()
    return module.weight.float()


@pytest.mark.parametrize("name, bits", [("gptq", 2), ("gptq", 3), ("gptq", 4), ("gptq", 8), ("rtn", 4),
                                        ("gptaq", 4)])
def test_checkpoint_layers_are_quantized_at_the_requested_bits(name, bits, tiny_grid, tiny_models, calibration,
                                                               shared_workspace):
    checkpoint = quantize(tiny_models["tiny-ar"], METHODS[name](bits=bits), calibration, shared_workspace)
    directory = checkpoint.directory(shared_workspace)
    module_bits = quantized_module_bits(directory)
    layers = tiny_grid.models[0].tiny.num_hidden_layers
    assert len(module_bits) == layers * 7  # q, k, v, o, gate, up, down in each layer
    assert set(module_bits.values()) == {bits}
    assert checkpoint.avg_bits == pytest.approx(bits)
    assert average_bits(directory) == pytest.approx(bits)


def test_quantized_weights_differ_from_full_precision_and_fewer_bits_err_more(tiny_models, calibration,
                                                                             shared_workspace):
    from qrobust.tasks.models.loading import load_model

    base = load_model(tiny_models["tiny-ar"], shared_workspace, "cpu")
    name = "model.layers.0.mlp.up_proj"
    reference = base.get_submodule(name).weight.float().clone()
    errors = {}
    for bits in (2, 4, 8):
        checkpoint = quantize(tiny_models["tiny-ar"], GPTQ(bits=bits), calibration, shared_workspace)
        model = load_model(checkpoint, shared_workspace, "cpu")
        assert type(model.get_submodule(name)).__name__ != "Linear"
        dequantized = _dequantized_weight(model, name)
        assert dequantized.shape == reference.shape
        errors[bits] = (dequantized - reference).pow(2).mean().item()
    assert errors[2] > errors[4] > errors[8] > 0


def test_quantizing_twice_reuses_the_saved_checkpoint(tiny_models, calibration, shared_workspace):
    method = GPTQ(bits=3)
    first = quantize(tiny_models["tiny-ar"], method, calibration, shared_workspace)
    second = quantize(tiny_models["tiny-ar"], method, calibration, shared_workspace)
    assert second.run.cached and first == second


def test_the_checkpoint_records_load_quantize_and_save_times(tiny_models, calibration, shared_workspace):
    checkpoint = quantize(tiny_models["tiny-ar"], GPTQ(bits=4), calibration, shared_workspace)
    assert set(checkpoint.seconds) == {"load", "quantize", "save"}
    assert all(seconds > 0 for seconds in checkpoint.seconds.values())
    assert checkpoint.quantize_seconds == pytest.approx(sum(checkpoint.seconds.values()))


def test_gptaq_corrects_for_its_own_input_error_so_its_weights_differ_from_gptq(tiny_models, calibration,
                                                                                shared_workspace):
    from qrobust.tasks.models.loading import load_model

    name = "model.layers.1.mlp.down_proj"  # a layer whose inputs come through earlier quantized layers
    weights = {}
    for method in (GPTQ(bits=3), GPTAQ(bits=3)):
        checkpoint = quantize(tiny_models["tiny-ar"], method, calibration, shared_workspace)
        weights[method.name] = _dequantized_weight(load_model(checkpoint, shared_workspace, "cpu"), name)
    assert not torch.equal(weights["gptq"], weights["gptaq"])


def test_reloaded_quantized_model_generates(tiny_models, calibration, shared_workspace):
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    checkpoint = quantize(tiny_models["tiny-ar"], GPTQ(bits=4), calibration, shared_workspace)
    model, tokenizer = load_model(checkpoint, shared_workspace, "cpu"), load_tokenizer(checkpoint, shared_workspace)
    ids = tokenizer(["def add(a, b):"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
