"""LLaDA-format checkpoints load natively as Llama, compute what LLaDA's own code computes,
sample as LLaDA's generate.py does, quantize, and feed HAWQ LLaDA's unshifted logits.

The reference outputs in fixtures/llada_reference.* were computed by LLaDA's published code
(modeling_llada.py and configuration_llada.py of GSAI-ML/LLaDA-8B-Instruct in the version that
takes an attention mask, run with trust_remote_code under transformers 4.46.2, and generate.py
of ML-GSAI/LLaDA, in float32; that modeling code does not load under the transformers qrobust
pins). Logits: on `write_tiny_llada_checkpoint(seed=0)`, an unpadded and a left-padded batch
(an older copy of the modeling file, which ignores masks, gave identical unpadded logits).
Answers: greedy `generate` on `write_tiny_llada_checkpoint(seed=0, vocab_size=126464)` with the
output rows of `<|endoftext|>` and `<|eot_id|>` scaled up (`favour_eos_and_eot`), so that
generate.py's `logits_eos_inf` and `confidence_eos_eot_inf`, which name those ids, change what
is written.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from qrobust.tasks.config import CalibrationSpec, ConfigError, GenerationSpec, ModelSpec, TinyArchitecture
from qrobust.tasks.decoding.diffusion import DiffusionSamplerSettings, diffusion_generate
from qrobust.tasks.methods.gptq import GPTQ
from qrobust.tasks.models.diffusion import attention_is_bidirectional, diffusion_logits
from qrobust.tasks.models.llada import (
    LLADA_8B_EMBEDDING_SIZE,
    LLADA_8B_TOKEN_IDS,
    LLADA_CONFIG_DEFAULTS,
    LLADA_TO_LLAMA,
    llada_config_to_llama,
    load_llada,
    load_llada_tokenizer,
    write_tiny_llada_checkpoint,
)
from qrobust.tasks.models.native import NativeCheckpointError, read_safetensors
from tests.pipeline import calibrate, prepare, quantize

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "llada_reference.json").read_text())
EOS, EOT = LLADA_8B_TOKEN_IDS["<|endoftext|>"], LLADA_8B_TOKEN_IDS["<|eot_id|>"]
TINY_LLADA = ModelSpec(name="tiny-llada", family="diffusion", tiny=TinyArchitecture(), architecture="llada",
                       logits_shift=False, dtype="bfloat16")
# LLaDA-8B-Instruct's config.json as published, and its safetensors index's total_size (bf16 bytes)
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}
LLADA_8B_SAFETENSORS_BYTES = 16031162368


def favour_eos_and_eot(directory: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    tensors["model.transformer.ff_out.weight"][EOS] *= 6.0
    tensors["model.transformer.ff_out.weight"][EOT] *= 4.0
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def weights_digest(directory: Path) -> str:
    tensors, digest = read_safetensors(directory), hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llada_checkpoint(tmp_path_factory.mktemp("llada"), seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_llada(checkpoint, torch.float32)


@pytest.fixture(scope="module")
def sampler_checkpoint(tmp_path_factory):
    directory = write_tiny_llada_checkpoint(tmp_path_factory.mktemp("llada-vocab"), seed=0,
                                            vocab_size=LLADA_8B_EMBEDDING_SIZE)
    return favour_eos_and_eot(directory)


@pytest.fixture(scope="module")
def sampler_model(sampler_checkpoint):
    return load_llada(sampler_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def reference_logits():
    from safetensors.torch import load_file

    return load_file(FIXTURES / "llada_reference.safetensors")


# --------------------------------------------------------------------------- the format

def test_tiny_checkpoint_is_written_in_lladas_format(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = read_safetensors(checkpoint)
    assert (config["model_type"], config["architectures"], config["block_type"]) == ("llada", ["LLaDAModelLM"], "llama")
    assert {"model.transformer.wte.weight", "model.transformer.blocks.1.attn_out.weight",
            "model.transformer.ff_out.weight"} <= set(tensors)
    assert json.loads((checkpoint / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("which", ["logits", "sampler"])
def test_tiny_checkpoints_are_the_ones_the_reference_outputs_were_computed_on(which, checkpoint, sampler_checkpoint):
    directory = checkpoint if which == "logits" else sampler_checkpoint
    assert weights_digest(directory) == REFERENCE["checkpoints"][which]["weights_sha256"]


def test_checkpoint_loads_natively_as_llama_with_every_tensor_in_its_place(model, checkpoint):
    from transformers import LlamaForCausalLM

    tensors = read_safetensors(checkpoint)
    assert type(model) is LlamaForCausalLM
    assert torch.equal(model.lm_head.weight, tensors["model.transformer.ff_out.weight"])
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, tensors["model.transformer.blocks.1.attn_out.weight"])
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, tensors["model.transformer.blocks.0.ff_proj.weight"])
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, tensors["model.transformer.blocks.0.ff_out.weight"])


# --------------------------------------------------------------------------- equivalence with LLaDA's code

def test_logits_equal_those_of_lladas_own_model_code(model, reference_logits):
    input_ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        logits = diffusion_logits(model, input_ids, torch.ones_like(input_ids), logits_shift=False)
    assert (logits - reference_logits["logits"]).abs().max().item() <= 1e-5


def test_logits_of_a_padded_batch_equal_lladas_at_every_real_position(model, reference_logits):
    """LLaDA counts pads in its rotary positions and qrobust does not; rotary attention sees only
    position differences, so the two agree up to rounding."""
    input_ids = torch.tensor(REFERENCE["padded_input_ids"])
    attention_mask = torch.tensor(REFERENCE["padded_attention_mask"])
    with torch.no_grad():
        logits = diffusion_logits(model, input_ids, attention_mask, logits_shift=False)
    real = attention_mask.bool()
    assert (logits[real] - reference_logits["padded_logits"][real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[case["name"] for case in REFERENCE["cases"]])
def test_greedy_answers_equal_those_of_lladas_generate(sampler_model, case):
    settings = DiffusionSamplerSettings(
        max_new_tokens=case["gen_length"], steps=case["steps"], block_length=case["block_length"], alg="maskgit_plus",
        logits_shift=False, suppressed_token_ids=(EOS,) if case["logits_eos_inf"] else (),
        confidence_excluded_token_ids=(EOS, EOT) if case["confidence_eos_eot_inf"] else (),
    )
    with torch.no_grad():
        answer = diffusion_generate(
            lambda ids, mask: diffusion_logits(sampler_model, ids, mask, logits_shift=False),
            torch.tensor(case["prompt_ids"]), torch.tensor(case["prompt_mask"]), settings,
            sampler_model.config.mask_token_id, torch.Generator().manual_seed(0),
        )
    assert answer.tolist() == case["answer_ids"]


def test_lladas_eos_settings_change_what_is_written():
    """The reference cases exercise both of LLaDA's eos settings: suppressing eos removes it from the
    answers, and leaving eos and <|eot_id|> out of the confidence changes the commit order."""
    cases = {case["name"]: case for case in REFERENCE["cases"]}
    assert any(EOS in row for row in cases["one_block_steps_eq_tokens"]["answer_ids"])
    assert not any(EOS in row for row in cases["logits_eos_inf"]["answer_ids"])
    excluded = cases["confidence_eos_eot_inf"]
    assert any(token in row for row in excluded["answer_ids"] for token in (EOS, EOT))


def test_tokenizer_names_the_configs_mask_token_and_keeps_lladas_chat_template(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = load_llada_tokenizer(checkpoint, config["mask_token_id"])
    assert (tokenizer.mask_token, tokenizer.mask_token_id) == ("<|mdm_mask|>", config["mask_token_id"])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": " Write add.\n"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWrite add.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


# --------------------------------------------------------------------------- configs and refusals

def test_llada_8b_config_converts_to_a_llama_of_exactly_its_published_size():
    from transformers import LlamaForCausalLM

    config = llada_config_to_llama({**LLADA_CONFIG_DEFAULTS, **LLADA_8B_CONFIG})
    with torch.device("meta"):
        parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert parameters == LLADA_8B_SAFETENSORS_BYTES // 2
    assert (config.head_dim, config.intermediate_size, config.rope_parameters["rope_theta"]) == (128, 12288, 500000.0)


@pytest.mark.parametrize("setting, value", [
    ("block_type", "sequential"), ("alibi", True), ("attention_layer_norm", True), ("include_bias", True),
    ("include_qkv_bias", True), ("scale_logits", True), ("weight_tying", True), ("activation_type", "swiglu"),
    ("layer_norm_type", "default"), ("input_emb_norm", True), ("rope", False),
])
def test_a_setting_under_which_llama_would_compute_another_function_is_refused_in_one_line(setting, value):
    with pytest.raises(NativeCheckpointError) as error:
        llada_config_to_llama({**LLADA_CONFIG_DEFAULTS, **LLADA_8B_CONFIG, setting: value})
    assert str(error.value).startswith(f"LLaDA setting {setting} = {value!r} is not supported")
    assert "\n" not in str(error.value)


def test_a_tensor_outside_lladas_layout_is_named_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_tiny_llada_checkpoint(tmp_path / "broken")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.transformer.blocks.0.q_norm.weight"] = torch.ones(64)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(NativeCheckpointError, match="1 tensor\\(s\\) outside LLaDA's layout: "
                                                    "model.transformer.blocks.0.q_norm.weight"):
        load_llada(directory, torch.float32)


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_tiny_llada_checkpoint(tmp_path / "broken")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(NativeCheckpointError, match="missing 1 key\\(s\\): model.layers.1.mlp.up_proj.weight"):
        load_llada(directory, torch.float32)


def test_every_linear_gptqmodels_llama_tree_quantizes_comes_from_a_llada_linear():
    from gptqmodel.models.definitions.llama import LlamaQModel

    attention, mlp = LlamaQModel.module_tree[3]["self_attn"], LlamaQModel.module_tree[3]["mlp"]
    quantized = {f"self_attn.{m.split(':')[0]}" for m in attention} | {f"mlp.{m.split(':')[0]}" for m in mlp}
    linears = {target for source, target in LLADA_TO_LLAMA.items() if not source.endswith("norm")}
    assert quantized == linears


def test_llada_with_shifted_logits_is_refused():
    with pytest.raises(ConfigError, match="architecture 'llada', whose logits are read unshifted; set logits_shift = false"):
        dataclasses.replace(TINY_LLADA, logits_shift=True)


# --------------------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from qrobust.tasks.runtime.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("llada-workspace"))
    base = prepare(TINY_LLADA, workspace)
    calibration = calibrate(CalibrationSpec(n_samples=8, seq_len=32), base, workspace)
    return workspace, base, calibration, quantize(base, GPTQ(bits=4, group_size=32), calibration, workspace)


def test_prepared_model_is_a_llama_checkpoint_marked_to_run_with_unshifted_logits(pipeline):
    workspace, base, _, _ = pipeline
    saved = json.loads((base.directory(workspace) / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert saved["qrobust"] == base.conversion
    assert (base.conversion["converted_from"], base.conversion["logits_shift"], base.logits_shift) == ("LLaDA", False, False)


def test_quantized_model_reloads_with_bidirectional_attention_and_answers_alike_alone_and_in_a_batch(pipeline):
    from qrobust.tasks.decoding.diffusion import answers
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    workspace, _, _, quantized = pipeline
    model, tokenizer = load_model(quantized, workspace, "cpu"), load_tokenizer(quantized, workspace)
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ != "Linear"
    assert attention_is_bidirectional(model)
    generation = GenerationSpec(max_new_tokens=12, steps=6, block_length=4, alg="maskgit_plus",
                                suppressed_tokens=("<|endoftext|>",), confidence_excluded_tokens=("<|eot_id|>",))
    prompts = ["def add(a, b):\n", 'import math\n\n\ndef area(r):\n    """Area of a circle."""\n']
    together = answers(model, tokenizer, prompts, generation, quantized, seed=0)[0]
    alone = [answers(model, tokenizer, [prompt], generation, quantized, seed=0)[0][0] for prompt in prompts]
    assert together == alone and any(together)


def test_hawq_traces_are_taken_on_lladas_unshifted_logits(pipeline, tmp_path):
    """The Hessian stage's masked-denoising loss reads logits as the prepared model says: the
    traces for LLaDA's unshifted convention differ from those the shifted one would give."""
    from qrobust.tasks.methods.hawq import HAWQ
    from qrobust.tasks.runtime.stage import StageContext
    from qrobust.tasks.stages.hessian import compute_layer_traces

    workspace, base, calibration, _ = pipeline
    curvature = HAWQ(budget=3.0, group_size=32, estimator="fisher").curvature
    traces = {}
    for shift in (False, True):
        directory = tmp_path / f"shift-{shift}"
        directory.mkdir()
        prepared = dataclasses.replace(base, logits_shift=shift)
        compute_layer_traces(StageContext(f"shift-{shift}", directory, workspace), prepared, curvature, calibration)
        traces[shift] = json.loads((directory / "traces.json").read_text())
    unshifted, shifted = traces[False], traces[True]
    assert unshifted.keys() == shifted.keys() and len(unshifted) == 2 * 7
    assert all(unshifted[name]["trace"] > 0 for name in unshifted)
    assert all(unshifted[name]["trace"] != shifted[name]["trace"] for name in unshifted)
