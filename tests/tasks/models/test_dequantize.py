"""The accuracy path (dequantized weights in plain linear layers) against gptqmodel's kernels.

Tolerance. Both paths multiply by the same bf16 weights. gptqmodel's reference torch kernel
(TorchLinear, chosen on CPU for 2, 3 and 8 bits) dequantizes exactly as the accuracy path does
and then runs the same matmul, so there the logits must be bit-identical. The CPU int4 kernel
(TorchAtenLinear, chosen for 4 bits) rounds and accumulates in its own way; its logits may
differ by rounding only. Allowed: 4 bf16 units in the last place of the largest logit, i.e.
4 * 2**-7 * max|logit| (bf16 keeps 8 significant bits); seen: about one unit.
"""

import pytest
import torch

from qrobust.tasks.config import CalibrationSpec, MethodSpec, ModelSpec, TinyArchitecture

BF16_RELATIVE_UNIT = 2.0**-7
ALLOWED_UNITS = 4
TINY_AR = ModelSpec(name="tiny-ar-untrained", family="ar", tiny=TinyArchitecture(), dtype="bfloat16")


@pytest.fixture(scope="module")
def quantize(tmp_path_factory):
    """bits -> the GPTQ checkpoint (group size 32) of an untrained tiny Qwen3 model."""
    from qrobust.tasks.stages.calibration import build_calibration
    from qrobust.tasks.models.loading import prepare_model
    from qrobust.tasks.stages.quantize import quantize_model
    from qrobust.tasks.runtime.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("dequantize"))
    base = prepare_model(TINY_AR, workspace)
    calibration = build_calibration(CalibrationSpec(n_samples=8, seq_len=32), base, workspace)
    return lambda bits: quantize_model(base, MethodSpec("gptq", bits=bits, group_size=32), calibration, workspace)


def _logits(model) -> torch.Tensor:
    input_ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _kernel_names(model) -> set[str]:
    return {type(model.get_submodule(f"model.layers.{i}.{name}")).__name__
            for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")}


def test_dequantized_model_holds_only_plain_linear_layers(quantize):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from qrobust.tasks.models.loading import load_model

    model = load_model(quantize(3), "cpu", weights="dequantized")
    assert not any(isinstance(m, BaseQuantLinear) for m in model.modules())
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 2 * 7 + 1  # seven projections per layer, and lm_head
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}


def test_reference_kernel_and_dequantized_weights_give_bit_identical_logits(quantize):
    from qrobust.tasks.models.loading import load_model

    checkpoint = quantize(3)
    kernel = load_model(checkpoint, "cpu")
    assert _kernel_names(kernel) == {"TorchLinear"}
    expected = _logits(kernel)
    assert torch.equal(_logits(load_model(checkpoint, "cpu", weights="dequantized")), expected)


def test_int4_kernel_and_dequantized_logits_agree_within_bf16_rounding(quantize):
    from qrobust.tasks.models.loading import load_model

    checkpoint = quantize(4)
    kernel = load_model(checkpoint, "cpu")
    assert _kernel_names(kernel) == {"TorchAtenLinear"}
    expected = _logits(kernel)
    dequantized = _logits(load_model(checkpoint, "cpu", weights="dequantized"))
    allowed = ALLOWED_UNITS * BF16_RELATIVE_UNIT * expected.abs().max()
    assert (dequantized - expected).abs().max() <= allowed


@pytest.mark.parametrize("bits", [2, 3])
def test_each_weight_group_holds_at_most_two_to_the_bits_distinct_values(quantize, bits):
    from qrobust.tasks.models.loading import load_model

    weight = load_model(quantize(bits), "cpu", weights="dequantized").get_submodule("model.layers.0.mlp.up_proj").weight
    groups = weight.reshape(weight.shape[0], -1, 32)  # [out, in / group_size, group_size]
    distinct = max(len(torch.unique(group)) for row in groups for group in row)
    assert 2 < distinct <= 2**bits


def test_a_full_precision_checkpoint_has_nothing_to_dequantize(tmp_path):
    from qrobust.tasks.models.dequantize import dequantized_model

    with pytest.raises(ValueError, match="is not quantized"):
        dequantized_model({"path": str(tmp_path), "quantized": False, "dtype": "bfloat16"})


def test_unknown_weights_mode_is_named_with_the_allowed_ones(quantize):
    from qrobust.tasks.models.loading import load_model

    with pytest.raises(ValueError, match="unknown weights mode 'fast'; allowed: kernel, dequantized"):
        load_model(quantize(3), "cpu", weights="fast")
