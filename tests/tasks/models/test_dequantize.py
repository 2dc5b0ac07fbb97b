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

from qrobust.tasks.config import CalibrationSpec, ModelSpec, TinyArchitecture
from qrobust.tasks.methods.gptq import GPTQ
from tests.pipeline import calibrate, prepare, quantize

BF16_RELATIVE_UNIT = 2.0**-7
ALLOWED_UNITS = 4
TINY_AR = ModelSpec(name="tiny-ar-untrained", family="ar", tiny=TinyArchitecture(), dtype="bfloat16")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from qrobust.tasks.runtime.workspace import Workspace

    return Workspace.at(tmp_path_factory.mktemp("dequantize"))


@pytest.fixture(scope="module")
def load(workspace):
    """(bits, weights) -> the GPTQ checkpoint (group size 32) of an untrained tiny Qwen3 model, loaded."""
    from qrobust.tasks.models.loading import load_model

    base = prepare(TINY_AR, workspace)
    calibration = calibrate(CalibrationSpec(n_samples=8, seq_len=32), base, workspace)

    def quantized(bits: int, weights: str = "kernel"):
        checkpoint = quantize(base, GPTQ(bits=bits, group_size=32), calibration, workspace)
        return load_model(checkpoint, workspace, "cpu", weights=weights)

    return quantized


def _logits(model) -> torch.Tensor:
    input_ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _kernel_names(model) -> set[str]:
    return {type(model.get_submodule(f"model.layers.{i}.{name}")).__name__
            for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")}


def test_dequantized_model_holds_only_plain_linear_layers(load):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear


    model = load(3, "dequantized")
    assert not any(isinstance(m, BaseQuantLinear) for m in model.modules())
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 2 * 7 + 1  # seven projections per layer, and lm_head
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}


def test_reference_kernel_and_dequantized_weights_give_bit_identical_logits(load):

    kernel = load(3)
    assert _kernel_names(kernel) == {"TorchLinear"}
    expected = _logits(kernel)
    assert torch.equal(_logits(load(3, "dequantized")), expected)


def test_int4_kernel_and_dequantized_logits_agree_within_bf16_rounding(load):

    kernel = load(4)
    assert _kernel_names(kernel) == {"TorchAtenLinear"}
    expected = _logits(kernel)
    dequantized = _logits(load(4, "dequantized"))
    allowed = ALLOWED_UNITS * BF16_RELATIVE_UNIT * expected.abs().max()
    assert (dequantized - expected).abs().max() <= allowed


@pytest.mark.parametrize("bits", [2, 3])
def test_each_weight_group_holds_at_most_two_to_the_bits_distinct_values(load, bits):

    weight = load(bits, "dequantized").get_submodule("model.layers.0.mlp.up_proj").weight
    groups = weight.reshape(weight.shape[0], -1, 32)  # [out, in / group_size, group_size]
    distinct = max(len(torch.unique(group)) for row in groups for group in row)
    assert 2 < distinct <= 2**bits


def test_a_full_precision_checkpoint_has_nothing_to_dequantize(tmp_path):
    from qrobust.tasks.models.dequantize import dequantized_model

    with pytest.raises(ValueError, match="is not quantized"):
        dequantized_model(tmp_path, "bfloat16")


def test_unknown_weights_mode_is_named_with_the_allowed_ones(load):

    with pytest.raises(ValueError, match="unknown weights mode 'fast'; allowed: kernel, dequantized"):
        load(3, "fast")
