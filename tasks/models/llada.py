"""LLaDA-format checkpoints, loaded natively as transformers' LlamaForCausalLM.

LLaDA-8B-Instruct (GSAI-ML) publishes its weights with remote code (`configuration_llada.py`,
`modeling_llada.py`: an OLMo-derived model class, `LLaDAModelLM`) written for transformers
4.38-4.49. qrobust never runs that code; it reads the format itself.

What a LLaDA checkpoint holds (from that modeling code):

- config.json: model_type "llada", architectures ["LLaDAModelLM"], an auto_map pointing at the
  remote code, and OLMo's field names (d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size,
  block_type, rope, rope_theta, rms_norm_eps, embedding_size, weight_tying, ...) plus
  `mask_token_id`. A field the file leaves out takes ModelConfig's default (`LLADA_CONFIG_DEFAULTS`).
- weights, under `model.transformer`: `wte` (embedding of embedding_size rows), `blocks.N`
  (block_type "llama": attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj,
  ff_out), `ln_f` and `ff_out` (the output projection, when weight_tying is off).
- the block computes x + attn_out(Attention(attn_norm(x))), then
  h + ff_out(silu(ff_proj(ff_norm(h))) * up_proj(ff_norm(h))): RMSNorm without bias, rotary
  embeddings over d_model / n_heads dimensions in the rotate-half layout, no attention bias,
  scaled dot-product attention without a causal mask. That is Llama's decoder layer, name for
  name (`LLADA_TO_LLAMA`): attn_norm -> input_layernorm, attn_out -> o_proj, ff_norm ->
  post_attention_layernorm, ff_proj -> gate_proj (the activated one), up_proj -> up_proj,
  ff_out -> down_proj; wte -> embed_tokens, ln_f -> norm, transformer.ff_out -> lm_head.
  Settings that would make the block compute something else (another block type, ALiBi, q/k
  norms, biases, scaled logits, input scaling, tied weights, another activation or norm) are
  refused with one line naming the setting.
- tokenizer: a tokenizer.json read by PreTrainedTokenizerFast, with no remote code; its chat
  template (`<|start_header_id|>...<|eot_id|>`, bos first) is kept as published. The mask token
  `<|mdm_mask|>` (126336) is an added token the tokenizer does not name as its mask; the
  conversion names it, taking the id from config.json.

What is not a property of the weights: attention is bidirectional, and LLaDA reads its logits
unshifted (position i's logits score token i; LLaDA's generate.py takes them as they come).
Every diffusion forward in qrobust goes through `qrobust.tasks.models.diffusion.diffusion_logits`
with logits_shift False, as the saved `qrobust` marker says. LLaDA's code gives a left-padded
row rotary positions that count the pads; rotary attention depends only on position
differences and pads are masked out, so the pads' count changes nothing but rounding.

Quantization. gptqmodel has no definition of LLaDA-8B (it defines LLaDA2-MoE, another
architecture). The converted checkpoint is a Llama checkpoint, and gptqmodel's Llama
definition declares the module tree that covers every Linear of a LLaDA block: q/k/v_proj and
o_proj (LLaDA's attn_out), gate/up/down_proj (ff_proj, up_proj, ff_out).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qrobust.tasks.config import TinyArchitecture
from qrobust.tasks.models.native import (
    NativeCheckpointError,
    listed,
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

FORMAT = "LLaDA"
LLADA_MODEL_TYPE = "llada"
LLADA_ARCHITECTURE = "LLaDAModelLM"
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}

# The defaults of LLaDA's ModelConfig (configuration_llada.py).
LLADA_CONFIG_DEFAULTS = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "rope": False,
    "rope_full_precision": True,
    "flash_attention": False,
    "attention_dropout": 0.1,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "residual_dropout": 0.1,
    "embedding_dropout": 0.1,
    "input_emb_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-05,
    "attention_layer_norm_with_affine": True,
    "max_sequence_length": 1024,
    "rope_theta": 10000.0,
    "include_qkv_bias": False,
    "include_bias": False,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
    "mask_token_id": 50256,
}
# The settings under which a LLaDA block computes exactly Llama's decoder layer.
SUPPORTED = {
    "block_type": ("llama",),
    "block_group_size": (1,),
    "alibi": (False,),
    "rope": (True,),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (None, False),
    "include_bias": (False,),
    "include_qkv_bias": (None, False),
    "activation_type": ("silu",),
    "scale_logits": (False,),
    "weight_tying": (False,),
}
# LLaDA block module -> Llama decoder-layer module, and the top-level modules.
LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
LLADA_TOP_LEVEL = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
BLOCK_PREFIX = "model.transformer.blocks."
BLOCK_TENSOR = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight")
# LLaDA-8B's special tokens (its tokenizer_config.json and generate.py)
LLADA_8B_TOKEN_IDS = {"<|endoftext|>": 126081, "<|mdm_mask|>": 126336, "<|eot_id|>": 126348}
LLADA_8B_EMBEDDING_SIZE = 126464


def read_llada_config(directory: Path) -> dict:
    """LLaDA's config.json with ModelConfig's defaults for absent fields; refuses other formats."""
    config = read_native_config(directory, FORMAT, (LLADA_MODEL_TYPE,), (LLADA_ARCHITECTURE,))
    return {**LLADA_CONFIG_DEFAULTS, **config}


def effective_kv_heads(values: dict) -> int:
    """Key/value heads as LLaDA's ModelConfig.effective_n_kv_heads resolves them."""
    heads, kv_heads, multi_query = values["n_heads"], values["n_kv_heads"], values["multi_query_attention"]
    if kv_heads is None:
        return 1 if multi_query else heads
    if multi_query is not None and kv_heads != (1 if multi_query else heads):
        raise NativeCheckpointError(
            f"LLaDA n_kv_heads {kv_heads} contradicts multi_query_attention {multi_query} with n_heads {heads}"
        )
    return kv_heads


def llada_config_to_llama(values: dict):
    """The LlamaConfig computing what a LLaDA config (with defaults filled in) describes."""
    from transformers import LlamaConfig

    refuse_unsupported(values, SUPPORTED, FORMAT)
    heads = values["n_heads"]
    if values["d_model"] % heads:
        raise NativeCheckpointError(f"LLaDA d_model {values['d_model']} is not divisible by n_heads {heads}")
    config = LlamaConfig(
        vocab_size=values["embedding_size"] or values["vocab_size"],
        hidden_size=values["d_model"],
        intermediate_size=values["mlp_hidden_size"] or values["mlp_ratio"] * values["d_model"],
        num_hidden_layers=values["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=effective_kv_heads(values),
        head_dim=values["d_model"] // heads,
        hidden_act="silu",
        max_position_embeddings=values["max_sequence_length"],
        rms_norm_eps=values["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(values["rope_theta"])},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=values["pad_token_id"],
        bos_token_id=values.get("bos_token_id"),
        eos_token_id=values["eos_token_id"],
        architectures=["LlamaForCausalLM"],
    )
    config.mask_token_id = values["mask_token_id"]
    return config


def llama_name(llada_name: str) -> str:
    """The LlamaForCausalLM parameter a LLaDA parameter becomes; a name outside the layout is an error."""
    if llada_name in LLADA_TOP_LEVEL:
        return LLADA_TOP_LEVEL[llada_name]
    match = BLOCK_TENSOR.fullmatch(llada_name)
    if match and match.group(2) in LLADA_TO_LLAMA:
        return f"model.layers.{match.group(1)}.{LLADA_TO_LLAMA[match.group(2)]}.weight"
    raise KeyError(llada_name)


def to_llama_names(tensors: dict, directory: Path) -> dict:
    """LLaDA's tensors under Llama's names; every name outside LLaDA's layout is named in one error."""
    renamed, unknown = {}, []
    for name, tensor in tensors.items():
        try:
            renamed[llama_name(name)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        raise NativeCheckpointError(
            f"LLaDA checkpoint {str(directory)!r} holds {len(unknown)} tensor(s) outside LLaDA's layout: {listed(sorted(unknown))}"
        )
    return renamed


def llada_parameter_shapes(values: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaDA checkpoint of this config (defaults filled in, a supported block)
    holds, by name, with its shape: LLaDAModelLM's state dict, written down from LLaDA's code."""
    hidden, heads = values["d_model"], values["n_heads"]
    kv_width = effective_kv_heads(values) * (hidden // heads)
    mlp = values["mlp_hidden_size"] or values["mlp_ratio"] * hidden
    vocab = values["embedding_size"] or values["vocab_size"]
    shapes = {"model.transformer.wte.weight": (vocab, hidden)}
    for layer in range(values["n_layers"]):
        prefix = f"{BLOCK_PREFIX}{layer}"
        shapes |= {
            f"{prefix}.attn_norm.weight": (hidden,),
            f"{prefix}.q_proj.weight": (hidden, hidden),
            f"{prefix}.k_proj.weight": (kv_width, hidden),
            f"{prefix}.v_proj.weight": (kv_width, hidden),
            f"{prefix}.attn_out.weight": (hidden, hidden),
            f"{prefix}.ff_norm.weight": (hidden,),
            f"{prefix}.ff_proj.weight": (mlp, hidden),
            f"{prefix}.up_proj.weight": (mlp, hidden),
            f"{prefix}.ff_out.weight": (hidden, mlp),
        }
    shapes["model.transformer.ln_f.weight"] = (hidden,)
    shapes["model.transformer.ff_out.weight"] = (vocab, hidden)
    return shapes


# --------------------------------------------------------------------------- loading

def load_llada(path_or_hub_id: str | Path, dtype="bfloat16", device="cpu"):
    """A LLaDA-format checkpoint as an eval-mode LlamaForCausalLM (sdpa attention).

    Run it through `diffusion_logits` with logits_shift=False for LLaDA's bidirectional
    attention and unshifted logits.
    """
    from transformers import LlamaForCausalLM

    dtype = torch_dtype(dtype)
    directory = resolve_checkpoint_directory(path_or_hub_id, FORMAT)
    config = llada_config_to_llama(read_llada_config(directory))
    tensors = to_llama_names(read_safetensors(directory), directory)
    return load_into(LlamaForCausalLM, config, tensors, directory, FORMAT, dtype).to(device)


def load_llada_tokenizer(directory: Path, mask_token_id: int):
    """The checkpoint's tokenizer.json read by PreTrainedTokenizerFast, with its mask token named."""
    tokenizer = load_tokenizer_without_remote_code(directory)
    mask_token = tokenizer.convert_ids_to_tokens(mask_token_id)
    if mask_token is None or mask_token == tokenizer.unk_token:
        raise NativeCheckpointError(
            f"LLaDA checkpoint {str(directory)!r}: its tokenizer has no token with the config's mask_token_id {mask_token_id}"
        )
    tokenizer.mask_token = mask_token
    return tokenizer


def convert_llada_checkpoint(
    path_or_hub_id: str | Path,
    directory: Path,
    dtype="bfloat16",
    expected_mask_token_id: int | None = None,
    source_name: str | None = None,
) -> dict:
    """Write a LLaDA-format checkpoint into `directory` as a standard Llama checkpoint plus tokenizer.

    Returns the `qrobust` marker also saved in its config.json: family, mask token id, logit
    shift (False: LLaDA's logits are read unshifted) and where it came from.
    """
    source = resolve_checkpoint_directory(path_or_hub_id, FORMAT)
    mask_token_id = read_llada_config(source)["mask_token_id"]
    if expected_mask_token_id is not None and expected_mask_token_id != mask_token_id:
        raise NativeCheckpointError(
            f"mask_token_id {expected_mask_token_id} given for {str(path_or_hub_id)!r}, but its config says {mask_token_id}"
        )
    marker = {
        "family": "diffusion",
        "mask_token_id": mask_token_id,
        "logits_shift": False,
        "converted_from": FORMAT,
        "source": source_name or str(path_or_hub_id),
    }
    tokenizer = load_llada_tokenizer(source, mask_token_id)
    return save_converted(load_llada(source, dtype, "cpu"), tokenizer, directory, marker)


# --------------------------------------------------------------------------- tiny checkpoints

# Special tokens of LLaDA's tokenizer that its chat template and sampler use.
LLADA_SPECIAL_TOKENS = ("<|startoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# bos, then each message between header ids, trimmed, ended by <|eot_id|>; then the assistant
# header: the layout of LLaDA-8B-Instruct's template.
TINY_LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
TINY_OUTPUT_SCALE = 4.0


def write_tiny_llada_checkpoint(directory: Path, arch: TinyArchitecture = TinyArchitecture(), seed: int | None = None,
                                shards: int = 1, vocab_size: int | None = None, padded_vocab_size: int | None = None, device: str = "cpu", dtype=None) -> Path:
    """A tiny checkpoint in LLaDA's format: LLaDA's config.json fields (a llama block, rope, RMSNorm,
    SiLU, no biases, untied output), its tensor names and a tokenizer.json with LLaDA's special
    tokens (`<|endoftext|>` as eos and pad, `<|mdm_mask|>` as the mask, `<|eot_id|>` ending a turn).

    With `vocab_size` (at least LLaDA-8B's 126464), the checkpoint instead has LLaDA-8B's
    vocabulary layout, special tokens at LLaDA-8B's ids, and no tokenizer: for comparing samplers
    whose published code names those ids. The mask token's output row is zero and the output
    projection is scaled up, as in the Dream-format tiny checkpoints (`tasks.models.dream`).
    `padded_vocab_size`, `device` and `dtype` as in `write_tiny_coda_checkpoint`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    require_heads_span_hidden(arch, "LLaDA")
    if vocab_size is None:
        token_ids = _write_llada_tokenizer(arch, directory)
        vocab_size = max(max(token_ids.values()) + 1, padded_vocab_size or 0)
    elif vocab_size < LLADA_8B_EMBEDDING_SIZE:
        raise NativeCheckpointError(f"vocab_size {vocab_size} is below LLaDA-8B's {LLADA_8B_EMBEDDING_SIZE}")
    else:
        token_ids = LLADA_8B_TOKEN_IDS
    config = {
        **LLADA_CONFIG_DEFAULTS,
        "architectures": [LLADA_ARCHITECTURE],
        "auto_map": LLADA_AUTO_MAP,
        "model_type": LLADA_MODEL_TYPE,
        "activation_type": "silu",
        "block_type": "llama",
        "rope": True,
        "layer_norm_type": "rms",
        "weight_tying": False,
        "include_qkv_bias": False,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "init_device": "meta",
        "d_model": arch.hidden_size,
        "n_heads": arch.num_attention_heads,
        "n_kv_heads": arch.num_key_value_heads,
        "n_layers": arch.num_hidden_layers,
        "mlp_hidden_size": arch.intermediate_size,
        "max_sequence_length": arch.max_position_embeddings,
        "vocab_size": vocab_size,
        "embedding_size": vocab_size,
        "eos_token_id": token_ids["<|endoftext|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "mask_token_id": token_ids["<|mdm_mask|>"],
        "precision": "amp_bf16",
        "use_cache": False,
        "transformers_version": "4.46.3",
    }
    generator = random_generator(arch.init_seed if seed is None else seed, device)
    tensors = {name: random_weight(name, shape, generator, TINY_OUTPUT_SCALE, dtype)
               for name, shape in llada_parameter_shapes(config).items()}
    tensors["model.transformer.ff_out.weight"][config["mask_token_id"]] = 0.0
    save_sharded(tensors, directory, shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _write_llada_tokenizer(arch: TinyArchitecture, directory: Path) -> dict[str, int]:
    """The tiny BPE with LLaDA's special tokens, saved as LLaDA ships its tokenizer (tokenizer.json,
    and a tokenizer_config naming PreTrainedTokenizerFast and no mask token); returns their ids."""
    from qrobust.tasks.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(arch.vocab_size)
    tokenizer.add_tokens(list(LLADA_SPECIAL_TOKENS), special_tokens=True)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", *LLADA_SPECIAL_TOKENS)}
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for token, i in sorted(ids.items(), key=lambda t: t[1])}
    roles = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    special = {"additional_special_tokens": roles, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    settings = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added, **special,
                "chat_template": TINY_LLADA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                "fast_tokenizer": True, "model_max_length": 1000000, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ids
