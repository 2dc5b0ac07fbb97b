"""Dream-format checkpoints load natively as Qwen2, compute what Dream's own code computes,
sample as Dream's sampler does, quantize and generate.

The reference outputs in fixtures/dream_reference.* were computed by Dream's published code
(configuration_dream.py, modeling_dream.py, generation_utils.py and tokenization_dream.py of
Dream-org/Dream-v0-Instruct-7B, run with trust_remote_code under the transformers version it
targets, 4.46.2, in float32; that code does not load under the transformers qrobust pins) on the
tiny checkpoint `write_tiny_dream_checkpoint(seed=0)` writes: logits of an unpadded and a
left-padded batch (Dream's sampler's own 4-D mask and positions), greedy answers of
`diffusion_generate`, and its tokenizer's encodings.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from qrobust.tasks.config import CalibrationSpec, GenerationSpec, ModelSpec, TinyArchitecture
from qrobust.tasks.decoding.diffusion import DiffusionSamplerSettings, diffusion_generate
from qrobust.tasks.methods.gptq import GPTQ
from qrobust.tasks.models.diffusion import attention_is_bidirectional, diffusion_logits
from qrobust.tasks.models.dream import (
    DREAM_CONFIG_DEFAULTS,
    dream_config_to_qwen2,
    load_dream,
    load_dream_tokenizer,
    read_dream_config,
    write_tiny_dream_checkpoint,
)
from qrobust.tasks.models.native import NativeCheckpointError, read_safetensors
from tests.pipeline import calibrate, prepare, quantize

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "dream_reference.json").read_text())
TINY_DREAM = ModelSpec(name="tiny-dream", family="diffusion", tiny=TinyArchitecture(), architecture="dream",
                       dtype="bfloat16")
# Dream-v0-Instruct-7B's config.json as published, and its safetensors index's total_size (bf16 bytes)
DREAM_7B_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 152064,
}
DREAM_7B_SAFETENSORS_BYTES = 15231233024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_dream_checkpoint(tmp_path_factory.mktemp("dream"), seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_dream(checkpoint, torch.float32)


@pytest.fixture(scope="module")
def reference_logits():
    from safetensors.torch import load_file

    return load_file(FIXTURES / "dream_reference.safetensors")


def weights_digest(directory: Path) -> str:
    tensors, digest = read_safetensors(directory), hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the format

def test_tiny_checkpoint_is_written_in_dreams_format(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("Dream", ["DreamModel"])
    assert config["auto_map"]["AutoModel"] == "modeling_dream.DreamModel"
    assert tokenizer_config["tokenizer_class"] == "DreamTokenizer"
    assert {"vocab.json", "merges.txt", "generation_config.json"} <= {p.name for p in checkpoint.iterdir()}


def test_tiny_checkpoint_is_the_one_the_reference_outputs_were_computed_on(checkpoint):
    assert weights_digest(checkpoint) == REFERENCE["checkpoint"]["weights_sha256"]


def test_checkpoint_loads_natively_as_qwen2_with_its_own_lm_head(model, checkpoint):
    from transformers import Qwen2ForCausalLM

    tensors = read_safetensors(checkpoint)
    assert type(model) is Qwen2ForCausalLM
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(model.model.layers[1].self_attn.q_proj.bias, tensors["model.layers.1.self_attn.q_proj.bias"])


# --------------------------------------------------------------------------- equivalence with Dream's code

def test_logits_equal_those_of_dreams_own_model_code(model, reference_logits):
    input_ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        logits = diffusion_logits(model, input_ids, torch.ones_like(input_ids), logits_shift=False)
    assert (logits - reference_logits["logits"]).abs().max().item() <= 1e-5


def test_logits_of_a_padded_batch_equal_dreams_at_every_real_position(model, reference_logits):
    input_ids = torch.tensor(REFERENCE["padded_input_ids"])
    attention_mask = torch.tensor(REFERENCE["padded_attention_mask"])
    with torch.no_grad():
        logits = diffusion_logits(model, input_ids, attention_mask, logits_shift=False)
    real = attention_mask.bool()
    assert (logits[real] - reference_logits["padded_logits"][real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[case["name"] for case in REFERENCE["cases"]])
def test_greedy_answers_equal_those_of_dreams_own_sampler(model, case):
    settings = DiffusionSamplerSettings(max_new_tokens=case["max_new_tokens"], steps=case["steps"], alg=case["alg"])
    with torch.no_grad():
        answer = diffusion_generate(
            lambda ids, mask: diffusion_logits(model, ids, mask, logits_shift=True),
            torch.tensor(case["prompt_ids"]), torch.tensor(case["prompt_mask"]), settings,
            model.config.mask_token_id, torch.Generator().manual_seed(0),
        )
    assert answer.tolist() == case["answer_ids"]


def test_tokenizer_encodes_as_dreams_own_tokenizer_and_keeps_its_chat_template(checkpoint):
    tokenizer = load_dream_tokenizer(checkpoint)
    for text, ids in REFERENCE["encodings"].items():
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write add."}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == REFERENCE["chat_template_output"]
    assert (tokenizer.mask_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|mask|>", "<|endoftext|>", "<|endoftext|>")


# --------------------------------------------------------------------------- configs and refusals

def test_dream_7b_config_converts_to_a_qwen2_of_exactly_its_published_size():
    from transformers import Qwen2ForCausalLM

    config = dream_config_to_qwen2({**DREAM_CONFIG_DEFAULTS, **DREAM_7B_CONFIG})
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert parameters == DREAM_7B_SAFETENSORS_BYTES // 2
    assert (config.mask_token_id, config.rope_parameters["rope_theta"]) == (151666, 1000000.0)


def test_an_absent_config_field_takes_dreams_default(tmp_path):
    directory = write_tiny_dream_checkpoint(tmp_path / "dream")
    config = json.loads((directory / "config.json").read_text())
    del config["mask_token_id"], config["rms_norm_eps"]
    (directory / "config.json").write_text(json.dumps(config))
    values = read_dream_config(directory)
    assert (values["mask_token_id"], values["rms_norm_eps"]) == (151666, 1e-6)


@pytest.mark.parametrize("change, fragment", [
    ({"use_sliding_window": True}, "Dream setting use_sliding_window = True is not supported"),
    ({"tie_word_embeddings": True}, "Dream setting tie_word_embeddings = True is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "Dream rope_scaling .* is not supported"),
])
def test_a_setting_qwen2_would_compute_differently_is_refused_in_one_line(change, fragment):
    with pytest.raises(NativeCheckpointError, match=fragment) as error:
        dream_config_to_qwen2({**DREAM_CONFIG_DEFAULTS, **DREAM_7B_CONFIG, **change})
    assert "\n" not in str(error.value)


def test_missing_and_unexpected_tensors_are_named_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_tiny_dream_checkpoint(tmp_path / "broken")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(NativeCheckpointError) as error:
        load_dream(directory, torch.float32)
    message = str(error.value)
    assert "missing 1 key(s): model.layers.1.self_attn.k_proj.bias" in message
    assert "unexpected 1 key(s): model.layers.0.self_attn.o_proj.bias" in message
    assert "\n" not in message


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    directory = write_tiny_dream_checkpoint(tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(NativeCheckpointError, match="is not a Dream checkpoint: model_type 'llama'"):
        load_dream(directory)


def test_gptqmodels_dream_definition_quantizes_the_module_tree_of_the_converted_qwen2():
    from gptqmodel.models.definitions.dream import DreamQModel
    from gptqmodel.models.definitions.qwen2 import Qwen2QModel

    assert DreamQModel.module_tree == Qwen2QModel.module_tree


# --------------------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from qrobust.tasks.runtime.workspace import Workspace

    workspace = Workspace.at(tmp_path_factory.mktemp("dream-workspace"))
    base = prepare(TINY_DREAM, workspace)
    calibration = calibrate(CalibrationSpec(n_samples=8, seq_len=32), base, workspace)
    return workspace, base, quantize(base, GPTQ(bits=4, group_size=32), calibration, workspace)


def test_prepared_model_is_a_qwen2_checkpoint_marked_with_how_to_run_it(pipeline):
    workspace, base, _ = pipeline
    saved = json.loads((base.directory(workspace) / "config.json").read_text())
    assert saved["model_type"] == "qwen2"
    assert saved["qrobust"] == base.conversion
    assert (base.conversion["converted_from"], base.conversion["logits_shift"], base.logits_shift) == ("Dream", True, True)
    assert base.mask_token_id == base.conversion["mask_token_id"] == 2


def test_quantized_model_reloads_with_bidirectional_attention_and_answers_alike_alone_and_in_a_batch(pipeline):
    from qrobust.tasks.decoding.diffusion import answers
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    workspace, _, quantized = pipeline
    model, tokenizer = load_model(quantized, workspace, "cpu"), load_tokenizer(quantized, workspace)
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ != "Linear"
    assert attention_is_bidirectional(model)
    generation = GenerationSpec(max_new_tokens=12, steps=6)
    prompts = ["def add(a, b):\n", 'import math\n\n\ndef area(r):\n    """Area of a circle."""\n']
    together = answers(model, tokenizer, prompts, generation, quantized, seed=0)[0]
    alone = [answers(model, tokenizer, [prompt], generation, quantized, seed=0)[0][0] for prompt in prompts]
    assert together == alone and any(together)
