"""Dream-format checkpoints, loaded natively as transformers' Qwen2ForCausalLM.

Dream-v0-Instruct-7B (Dream-org), Dream-Coder-v0-Instruct-7B (Dream-org) and
DiffuCoder-7B-Instruct (apple) are published in one format: Dream's remote code
(`configuration_dream.py`, `modeling_dream.py`, `generation_utils.py`, `tokenization_dream.py`
beside the weights of Dream-org/Dream-v0-Instruct-7B), written for transformers 4.46. qrobust
never runs that code; it reads the format itself.

What a Dream checkpoint holds (from that modeling code):

- config.json: model_type "Dream", architectures ["DreamModel"], an auto_map pointing at the
  remote code, Qwen2's hyper-parameter names and Dream's `mask_token_id`. A field the file
  leaves out takes DreamConfig's default (`DREAM_CONFIG_DEFAULTS`), as Dream's code would give it.
- weights: DreamModel keeps its backbone as `model` (embed_tokens, layers.N, norm) and its
  output projection as `lm_head`. Each layer is Qwen2's: q/k/v projections with biases, o
  projection without, SiLU-gated MLP (gate/up/down), RMSNorm before attention and MLP; the
  head dimension is hidden_size / num_attention_heads; rotary tables are computed, not saved.
  The parameter names are therefore Qwen2ForCausalLM's and the key map is the identity
  (`dream_parameter_shapes` lists them). The loader compares both name sets and shapes and
  names every difference. lm_head is a matrix of its own in every published Dream model; a
  config that ties it is refused.
- tokenizer: vocab.json and merges.txt read by `DreamTokenizer`, a copy of Qwen2's byte-level
  BPE tokenizer; its tokenizer_config names that class and the remote code. The conversion
  reads the same files with transformers' Qwen2Tokenizer and keeps the special tokens (mask
  `<|mask|>`, pad and eos `<|endoftext|>`) and the chat template as the checkpoint declares them.

What is not a property of the weights: attention is bidirectional (Dream's attention modules
are built with is_causal False and are given a full mask), and Dream reads its logits shifted
right by one (`generation_utils.py`: position i takes the logits of position i - 1). Every
diffusion forward in qrobust goes through `qrobust.tasks.models.diffusion.diffusion_logits`,
which passes a 4-D bidirectional mask over the non-pad tokens and applies the shift, as the
`qrobust` marker saved with the converted checkpoint says.

Quantization. gptqmodel defines Dream (`DreamQModel`) as Llama's module tree loaded through
`AutoModel`, i.e. through Dream's remote code; its Qwen2 definition is the same module tree.
The converted checkpoint is a Qwen2 checkpoint, so gptqmodel quantizes exactly the modules,
in the order, its Dream definition names, without the remote code; the quantize stage marks
the model non-causal before calibration so that layer inputs come from bidirectional attention.
"""

from __future__ import annotations

import json
from pathlib import Path

from qrobust.tasks.config import TinyArchitecture
from qrobust.tasks.models.native import (
    NativeCheckpointError,
    load_into,
    load_tokenizer_without_remote_code,
    random_generator,
    random_weight,
    require_heads_span_hidden,
    read_native_config,
    read_safetensors,
    refuse_unsupported,
    resolve_checkpoint_directory,
    save_converted,
    save_sharded,
    torch_dtype,
)

FORMAT = "Dream"
DREAM_MODEL_TYPE = "Dream"
DREAM_ARCHITECTURE = "DreamModel"
DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"}
DREAM_TOKENIZER_CLASS = "DreamTokenizer"
DREAM_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}

# The defaults of DreamConfig.__init__ (Dream's configuration_dream.py).
DREAM_CONFIG_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": False,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "mask_token_id": 151666,
    "pad_token_id": 151643,
    "bos_token_id": None,
    "eos_token_id": None,
}
# Dream's attention has no sliding window, and its published models keep lm_head untied.
SUPPORTED = {"use_sliding_window": (False,), "tie_word_embeddings": (False,)}


def read_dream_config(directory: Path) -> dict:
    """Dream's config.json with DreamConfig's defaults for absent fields; refuses other formats."""
    config = read_native_config(directory, FORMAT, (DREAM_MODEL_TYPE,), (DREAM_ARCHITECTURE,))
    return {**DREAM_CONFIG_DEFAULTS, **config}


def dream_config_to_qwen2(values: dict):
    """The Qwen2Config computing what a Dream config (with defaults filled in) describes."""
    from transformers import Qwen2Config

    _check_rope(values)
    refuse_unsupported(values, SUPPORTED, FORMAT)
    heads = values["num_attention_heads"]
    if values["hidden_size"] % heads:
        raise NativeCheckpointError(
            f"Dream hidden_size {values['hidden_size']} is not divisible by num_attention_heads {heads}"
        )
    config = Qwen2Config(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=values["num_key_value_heads"] or heads,
        hidden_act=values["hidden_act"],
        max_position_embeddings=values["max_position_embeddings"],
        initializer_range=values["initializer_range"],
        rms_norm_eps=values["rms_norm_eps"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(values["rope_theta"])},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=values["max_window_layers"],
        attention_dropout=values["attention_dropout"],
        pad_token_id=values["pad_token_id"],
        bos_token_id=values["bos_token_id"],
        eos_token_id=values["eos_token_id"],
        architectures=["Qwen2ForCausalLM"],
    )
    config.mask_token_id = values["mask_token_id"]
    return config


def _check_rope(values: dict) -> None:
    # a config re-saved by a newer transformers may hold the rotary settings as rope_parameters
    rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type")) != "default":
        raise NativeCheckpointError(f"Dream rope_scaling {rope!r} is not supported; allowed: null or rope_type 'default'")


def dream_parameter_shapes(values: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a Dream checkpoint of this config (defaults filled in) holds, by name, with its
    shape: the layout of DreamModel's state dict, written down from Dream's modeling code."""
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    head_dim, kv_heads = hidden // heads, values["num_key_value_heads"] or heads
    intermediate, vocab = values["intermediate_size"], values["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(values["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name, width in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (width, hidden)
            shapes[f"{prefix}.self_attn.{name}.bias"] = (width,)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# --------------------------------------------------------------------------- loading

def load_dream(path_or_hub_id: str | Path, dtype="bfloat16", device="cpu"):
    """A Dream-format checkpoint as an eval-mode Qwen2ForCausalLM (sdpa attention).

    Run it through `diffusion_logits` (logits_shift=True) for Dream's bidirectional attention
    and logit shift.
    """
    from transformers import Qwen2ForCausalLM

    dtype = torch_dtype(dtype)
    directory = resolve_checkpoint_directory(path_or_hub_id, FORMAT)
    config = dream_config_to_qwen2(read_dream_config(directory))
    model = load_into(Qwen2ForCausalLM, config, read_safetensors(directory), directory, FORMAT, dtype)
    return model.to(device)


def load_dream_tokenizer(directory: Path):
    """The checkpoint's own tokenizer files read by Qwen2Tokenizer, of which DreamTokenizer is a copy."""
    return load_tokenizer_without_remote_code(directory, {"tokenizer_class": "Qwen2Tokenizer", "auto_map": None})


def convert_dream_checkpoint(
    path_or_hub_id: str | Path,
    directory: Path,
    dtype="bfloat16",
    expected_mask_token_id: int | None = None,
    source_name: str | None = None,
) -> dict:
    """Write a Dream-format checkpoint into `directory` as a standard Qwen2 checkpoint plus tokenizer.

    Returns the `qrobust` marker also saved in its config.json: family, mask token id, logit
    shift and where it came from. A mask id given by the caller must agree with the checkpoint's,
    and so must the tokenizer's mask token.
    """
    source = resolve_checkpoint_directory(path_or_hub_id, FORMAT)
    mask_token_id = read_dream_config(source)["mask_token_id"]
    if expected_mask_token_id is not None and expected_mask_token_id != mask_token_id:
        raise NativeCheckpointError(
            f"mask_token_id {expected_mask_token_id} given for {str(path_or_hub_id)!r}, but its config says {mask_token_id}"
        )
    tokenizer = load_dream_tokenizer(source)
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != mask_token_id:
        raise NativeCheckpointError(
            f"Dream checkpoint {str(path_or_hub_id)!r}: config mask_token_id {mask_token_id} differs from its "
            f"tokenizer's mask token {tokenizer.mask_token!r} ({tokenizer.mask_token_id})"
        )
    marker = {
        "family": "diffusion",
        "mask_token_id": mask_token_id,
        "logits_shift": True,
        "converted_from": FORMAT,
        "source": source_name or str(path_or_hub_id),
    }
    return save_converted(load_dream(source, dtype, "cpu"), tokenizer, directory, marker)


# --------------------------------------------------------------------------- tiny checkpoints

# A ChatML template with Dream's default system message, in the layout of Dream's own.
TINY_DREAM_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BEGIN_OF_TEXT = "<|beginoftext|>"
# generation_config.json of a Dream checkpoint (Dream's model class reads it when loading)
DREAM_GENERATION_DEFAULTS = {
    "alg": "origin", "alg_temp": None, "eps": 0.001, "mask_token_id": None, "output_history": False,
    "steps": 512, "temperature": 0.0, "top_k": None, "top_p": None, "transformers_version": "4.46.2",
}
TINY_OUTPUT_SCALE = 4.0


def write_tiny_dream_checkpoint(directory: Path, arch: TinyArchitecture = TinyArchitecture(), seed: int | None = None,
                                shards: int = 1, padded_vocab_size: int | None = None, device: str = "cpu", dtype=None) -> Path:
    """A tiny checkpoint in Dream's format: Dream's config.json fields, tensor names and tokenizer
    files (vocab.json, merges.txt, a tokenizer_config naming DreamTokenizer), random weights.

    Pad and eos are `<|endoftext|>` and the mask is `<|mask|>`, as in Dream's tokenizer. The
    mask token's output row is zero, as the row of a token no training target ever is would be
    near, and the output projection is scaled up so that, as in a trained model, logits are
    spread and the mask token's probability is negligible: then the authors' samplers, which
    may draw the mask token, and qrobust's, which never does, see the same choices.
    `padded_vocab_size`, `device` and `dtype` as in `write_tiny_coda_checkpoint`.
    """
    from qrobust.tasks.models.tiny import build_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    require_heads_span_hidden(arch, "Dream")
    tokenizer = build_tokenizer(arch.vocab_size)
    token_ids = _write_dream_tokenizer(tokenizer, directory)
    config = {
        **DREAM_CONFIG_DEFAULTS,
        "architectures": [DREAM_ARCHITECTURE],
        "auto_map": DREAM_AUTO_MAP,
        "model_type": DREAM_MODEL_TYPE,
        "vocab_size": max(token_ids[BEGIN_OF_TEXT] + 1, padded_vocab_size or 0),
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "max_position_embeddings": arch.max_position_embeddings,
        "max_window_layers": arch.num_hidden_layers,
        "sliding_window": None,
        "use_mrope": False,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|endoftext|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "mask_token_id": token_ids["<|mask|>"],
        "torch_dtype": "float32",
        "transformers_version": "4.46.2",
    }
    generator = random_generator(arch.init_seed if seed is None else seed, device)
    tensors = {name: random_weight(name, shape, generator, TINY_OUTPUT_SCALE, dtype)
               for name, shape in dream_parameter_shapes(config).items()}
    tensors["lm_head.weight"][config["mask_token_id"]] = 0.0
    save_sharded(tensors, directory, shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {**DREAM_GENERATION_DEFAULTS, **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory


def _write_dream_tokenizer(tokenizer, directory: Path) -> dict[str, int]:
    """The tiny BPE as Dream ships a tokenizer; returns the special tokens' ids."""
    tokenizer.backend_tokenizer.model.save(str(directory))  # vocab.json, merges.txt
    vocab = json.loads((directory / "vocab.json").read_text())
    ids = {token: vocab[token] for token in ("<|endoftext|>", "<|im_end|>", "<|mask|>")}
    ids[BEGIN_OF_TEXT] = len(vocab)
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for token, i in sorted(ids.items(), key=lambda t: t[1])}
    settings = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [BEGIN_OF_TEXT, "<|mask|>"],
        "auto_map": DREAM_TOKENIZER_AUTO_MAP,
        "bos_token": BEGIN_OF_TEXT,
        "chat_template": TINY_DREAM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "mask_token": "<|mask|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": DREAM_TOKENIZER_CLASS,
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (directory / "added_tokens.json").write_text(json.dumps(dict(sorted(ids.items())), indent=2))
    special = {"additional_special_tokens": [BEGIN_OF_TEXT, "<|mask|>"], "bos_token": BEGIN_OF_TEXT,
               "eos_token": "<|endoftext|>", "mask_token": "<|mask|>", "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ids
