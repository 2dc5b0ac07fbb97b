import pytest
import torch

from qrobust.tasks.config import MethodSpec
from qrobust.tasks.stages.quantize import average_bits, quantize_model, quantized_module_bits


@pytest.fixture(scope="module")
def calibration(stdlib_calibration, tiny_models, shared_workspace):
    from qrobust.tasks.stages.calibration import build_calibration

    return build_calibration(stdlib_calibration, tiny_models["tiny-ar"], shared_workspace)


def _dequantized_weight(model, name):
    module = model.get_submodule(name)
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight().T.float()
    return module.weight.float()


@pytest.mark.parametrize("name, bits", [("gptq", 2), ("gptq", 3), ("gptq", 4), ("gptq", 8), ("rtn", 4)])
def test_checkpoint_layers_are_quantized_at_the_requested_bits(name, bits, tiny_grid, tiny_models, calibration,
                                                               shared_workspace):
    checkpoint = quantize_model(tiny_models["tiny-ar"], MethodSpec(name, bits=bits), calibration, shared_workspace)
    module_bits = quantized_module_bits(checkpoint["path"])
    layers = tiny_grid.models[0].tiny.num_hidden_layers
    assert len(module_bits) == layers * 7  # q, k, v, o, gate, up, down in each layer
    assert set(module_bits.values()) == {bits}
    assert checkpoint["avg_bits"] == pytest.approx(bits)
    assert average_bits(checkpoint["path"]) == pytest.approx(bits)


def test_quantized_weights_differ_from_full_precision_and_fewer_bits_err_more(tiny_models, calibration,
                                                                             shared_workspace):
    from qrobust.tasks.models.loading import load_model

    base = load_model(tiny_models["tiny-ar"], "cpu")
    name = "model.layers.0.mlp.up_proj"
    reference = base.get_submodule(name).weight.float().clone()
    errors = {}
    for bits in (2, 4, 8):
        checkpoint = quantize_model(tiny_models["tiny-ar"], MethodSpec("gptq", bits=bits), calibration, shared_workspace)
        model = load_model(checkpoint, "cpu")
        assert type(model.get_submodule(name)).__name__ != "Linear"
        dequantized = _dequantized_weight(model, name)
        assert dequantized.shape == reference.shape
        errors[bits] = (dequantized - reference).pow(2).mean().item()
    assert errors[2] > errors[4] > errors[8] > 0


def test_full_precision_method_returns_the_base_checkpoint_unchanged(tiny_models, shared_workspace):
    checkpoint = quantize_model(tiny_models["tiny-ar"], MethodSpec("fp"), None, shared_workspace)
    assert checkpoint["path"] == tiny_models["tiny-ar"]["path"]
    assert checkpoint["quantized"] is False


def test_quantizing_twice_reuses_the_saved_checkpoint(tiny_models, calibration, shared_workspace):
    method = MethodSpec("gptq", bits=3)
    first = quantize_model(tiny_models["tiny-ar"], method, calibration, shared_workspace)
    second = quantize_model(tiny_models["tiny-ar"], method, calibration, shared_workspace)
    assert first == second


def test_reloaded_quantized_model_generates(tiny_models, calibration, shared_workspace):
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    checkpoint = quantize_model(tiny_models["tiny-ar"], MethodSpec("gptq", bits=4), calibration, shared_workspace)
    model, tokenizer = load_model(checkpoint, "cpu"), load_tokenizer(checkpoint)
    ids = tokenizer(["def add(a, b):"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
