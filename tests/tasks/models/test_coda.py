"""CoDA checkpoints load natively as Qwen3, compute CoDA's forward pass, quantize and generate."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qrobust.tasks.config import CalibrationSpec, GenerationSpec, ModelSpec, TinyArchitecture
from qrobust.tasks.methods.gptq import GPTQ
from tests.pipeline import calibrate, prepare, quantize
from qrobust.tasks.models.coda import (
    CODA_CONFIG_DEFAULTS,
    CodaCheckpointError,
    coda_config_to_qwen3,
    load_coda,
    write_tiny_coda_checkpoint,
)
from qrobust.tasks.models.diffusion import attention_is_bidirectional, diffusion_logits

TINY_CODA = ModelSpec(
    name="tiny-coda", family="diffusion", tiny=TinyArchitecture(), architecture="coda", dtype="bfloat16"
)
GREEDY = GenerationSpec(max_new_tokens=12, steps=6, temperature=0.0)
SHORT_PROMPT = "def add(a, b):\n"
LONG_PROMPT = 'import math\n\n\ndef circle_area(radius):\n    """Area of a circle of the given radius."""\n'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint in CoDA's format, split over two safetensors files with an index."""
    return write_tiny_coda_checkpoint(tmp_path_factory.mktemp("coda"), shards=2)


@pytest.fixture(scope="module")
def config(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())


@pytest.fixture(scope="module")
def file_tensors(checkpoint):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_coda(checkpoint, torch.float32)


def reference_coda_logits(tensors: dict, config: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """CoDA's forward pass written out in plain torch from its architecture, for unpadded rows:
    RMSNorm; q/k-norm per head, then rotary embeddings (rotate-half); grouped-query attention
    over every position (no causal mask); SiLU-gated MLP; final norm; its own lm_head."""
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, batch, length = config["rms_norm_eps"], *input_ids.shape

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    frequencies = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * frequencies[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None, :, None], torch.cat([angles.sin()] * 2, -1)[None, :, None]

    def rotary(x):
        half = head_dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def weight(name):
        return tensors[name].float()

    x = weight("model.embed_tokens.weight")[input_ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, weight(p + "input_layernorm.weight"))
        q = (h @ weight(p + "self_attn.q_proj.weight").T).view(batch, length, heads, head_dim)
        k = (h @ weight(p + "self_attn.k_proj.weight").T).view(batch, length, kv_heads, head_dim)
        v = (h @ weight(p + "self_attn.v_proj.weight").T).view(batch, length, kv_heads, head_dim)
        q = rotary(rms_norm(q, weight(p + "self_attn.q_norm.weight")))
        k = rotary(rms_norm(k, weight(p + "self_attn.k_norm.weight"))).repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
        attention = (torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attention, v).reshape(batch, length, heads * head_dim)
        x = x + out @ weight(p + "self_attn.o_proj.weight").T
        h = rms_norm(x, weight(p + "post_attention_layernorm.weight"))
        gated = F.silu(h @ weight(p + "mlp.gate_proj.weight").T) * (h @ weight(p + "mlp.up_proj.weight").T)
        x = x + gated @ weight(p + "mlp.down_proj.weight").T
    return rms_norm(x, weight("model.norm.weight")) @ weight("lm_head.weight").T


def test_tiny_checkpoint_is_written_in_codas_format(checkpoint, config):
    assert config["model_type"] == "CoDA"
    assert config["architectures"] == ["CoDALanguageModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_coda.CoDALanguageModel"
    assert config["tie_word_embeddings"] is True  # CoDAConfig's default, which CoDA's model ignores
    assert (checkpoint / "model.safetensors.index.json").exists()
    assert len(list(checkpoint.glob("*.safetensors"))) == 2


def test_checkpoint_loads_natively_with_codas_own_lm_head(model, file_tensors):
    from transformers import Qwen3ForCausalLM

    assert type(model) is Qwen3ForCausalLM
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, file_tensors["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_logits_equal_an_independent_forward_of_codas_architecture(model, file_tensors, config):
    input_ids = torch.randint(3, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    expected = reference_coda_logits(file_tensors, config, input_ids)
    ones = torch.ones_like(input_ids)
    with torch.no_grad():
        unshifted = diffusion_logits(model, input_ids, ones, logits_shift=False)
        shifted = diffusion_logits(model, input_ids, ones, logits_shift=True)
    torch.testing.assert_close(unshifted, expected, atol=1e-4, rtol=1e-4)
    # CoDA reads position i's prediction from the logits of position i - 1
    torch.testing.assert_close(shifted[:, 1:], expected[:, :-1], atol=1e-4, rtol=1e-4)


def test_attention_is_bidirectional_with_padding_only_through_diffusion_logits(model):
    assert attention_is_bidirectional(model)
    assert not attention_is_bidirectional(model, through_diffusion_logits=False)


def test_missing_and_unexpected_tensors_are_named_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_tiny_coda_checkpoint(tmp_path / "broken")
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weights"] = tensors.pop("lm_head.weight")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CodaCheckpointError) as error:
        load_coda(directory, torch.float32)
    message = str(error.value)
    assert "missing 2 key(s): lm_head.weight, model.layers.1.self_attn.k_norm.weight" in message
    assert "unexpected 1 key(s): lm_head.weights" in message
    assert "\n" not in message


def test_a_checkpoint_of_another_model_type_is_refused(tmp_path):
    directory = write_tiny_coda_checkpoint(tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CodaCheckpointError, match="is not a CoDA checkpoint: model_type 'llama'"):
        load_coda(directory)


def test_an_absent_config_field_takes_codas_default_which_is_coda_1_7b():
    qwen3 = coda_config_to_qwen3({"model_type": "CoDA"})
    assert (qwen3.hidden_size, qwen3.num_hidden_layers, qwen3.intermediate_size) == (2048, 28, 6144)
    assert (qwen3.num_attention_heads, qwen3.num_key_value_heads, qwen3.head_dim) == (16, 8, 128)
    assert qwen3.vocab_size == 151936 and qwen3.mask_token_id == 151669
    assert qwen3.rope_parameters["rope_theta"] == CODA_CONFIG_DEFAULTS["rope_theta"]
    assert qwen3.tie_word_embeddings is False


def test_rope_scaling_codas_code_does_not_implement_is_refused():
    with pytest.raises(CodaCheckpointError, match="rope_scaling .* is not supported"):
        coda_config_to_qwen3({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})


# --------------------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny CoDA-format model prepared (converted) and GPTQ-quantized by the stages."""
    from qrobust.tasks.runtime.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("coda-workspace"))
    base = prepare(TINY_CODA, workspace)
    calibration = calibrate(CalibrationSpec(n_samples=8, seq_len=32), base, workspace)
    quantized = quantize(base, GPTQ(bits=4, group_size=32), calibration, workspace)
    return workspace, base, quantized


def test_prepared_model_is_a_converted_checkpoint_marked_with_how_to_run_it(pipeline):
    workspace, base, _ = pipeline
    saved = json.loads((base.directory(workspace) / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and saved["tie_word_embeddings"] is False
    assert saved["qrobust"] == base.conversion
    assert base.conversion | {"source": None} == {
        "family": "diffusion", "mask_token_id": 2, "logits_shift": True, "converted_from": "CoDA", "source": None,
    }
    assert base.mask_token_id == 2


def _answers(workspace, checkpoint, prompts):
    from qrobust.tasks.decoding.diffusion import answers
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(checkpoint, workspace, "cpu"), load_tokenizer(checkpoint, workspace)
    return answers(model, tokenizer, prompts, GREEDY, checkpoint, seed=0)[0]


@pytest.mark.parametrize("stage", ["full precision", "gptq 4-bit"])
def test_an_answer_generated_in_a_padded_batch_equals_the_answer_generated_alone(pipeline, stage):
    workspace = pipeline[0]
    checkpoint = pipeline[1] if stage == "full precision" else pipeline[2]
    together = _answers(workspace, checkpoint, [SHORT_PROMPT, LONG_PROMPT])
    alone = [_answers(workspace, checkpoint, [SHORT_PROMPT])[0], _answers(workspace, checkpoint, [LONG_PROMPT])[0]]
    assert together == alone
    assert any(together)  # the comparison is between real answers, not empty strings


def test_quantized_model_reloads_with_bidirectional_attention(pipeline):
    from qrobust.tasks.models.loading import load_model

    workspace, _, quantized = pipeline
    model = load_model(quantized, workspace, "cpu")
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ != "Linear"
    assert attention_is_bidirectional(model)
