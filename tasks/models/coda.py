"""CoDA checkpoints, loaded natively as transformers' Qwen3ForCausalLM.

CoDA (Salesforce/CoDA-v0-Instruct, -Base) publishes remote code that forces a flash-attention
kernel (it fails on CPU and in fp32), ignores the attention mask (padding leaks into attention),
returns a bare tuple in eval mode and targets transformers 4.47-4.49. qrobust never runs that
code: it reads CoDA's config.json and safetensors itself and puts the weights into the
transformers model they belong to.

What a CoDA checkpoint holds (from CoDA's model code, `CoDALanguageModel/modeling_coda.py` and
`model_config.py` of SalesforceAIResearch/CoDA):

- config.json: model_type "CoDA", architectures ["CoDALanguageModel"], an auto_map pointing at
  the remote code, Qwen3's hyper-parameter names (hidden_size, num_attention_heads, head_dim,
  rope_theta, rms_norm_eps, ...) and CoDA's own fields: mask_token_id, attention_kernel and
  training-only masking settings. A field the file leaves out takes CoDAConfig's default
  (`CODA_CONFIG_DEFAULTS`), as CoDA's own code would give it.
- weights: CoDALanguageModel keeps its backbone as `model` (embed_tokens, layers.N, norm) and its
  output projection as `lm_head`; every layer names its modules as Qwen3's does
  (self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,down}_proj, input_layernorm,
  post_attention_layernorm), and `layers` is an nn.Sequential, numbered as Qwen3's ModuleList
  is. The attention-kernel wrapper (`self_attn.attention_block`) holds no weights and the
  rotary table is not saved. CoDA's parameter names are therefore Qwen3ForCausalLM's, and the
  key map is the identity (`coda_parameter_shapes` lists them). The loader still compares both
  name sets and shapes and names every difference, so a checkpoint of any other layout fails
  instead of loading part of its weights.
- lm_head is a matrix of its own. CoDAConfig defaults tie_word_embeddings to True, but CoDA's
  model class never ties; transformers' Qwen3 honours the flag and would replace lm_head by the
  embedding. The conversion therefore always unties.
- The forward pass is Qwen3's (RMSNorm, q/k-norm per head before rotary embeddings, GQA, SiLU
  MLP, positions 0..L-1) with bidirectional attention, and CoDA reads its logits shifted right
  by one. Neither of these is a property of the weights: every diffusion forward in qrobust goes
  through `qrobust.tasks.models.diffusion.diffusion_logits`, which passes a 4-D bidirectional mask over
  the non-pad tokens (so an answer generated in a batch equals the same answer generated alone)
  and applies the shift.

Quantization. `convert_coda_checkpoint` writes the natively loaded model once as a standard
Qwen3 checkpoint (with its tokenizer and a `qrobust` marker: family, mask id, logit shift),
and gptqmodel quantizes that as its registered Qwen3 architecture. A gptqmodel definition of
CoDA's own (in the style of its Dream definition, `loader = AutoModel`) would add nothing: a
definition tells gptqmodel how to load the model, and loading CoDA through AutoModel is running
the remote code this module avoids; and which modules to quantize in which order (its
module_tree), which for CoDA is Qwen3's, name for name. What GPTQ needs beyond that is each
layer's inputs as the model really computes them; the quantize stage marks a diffusion model
non-causal before calibration (`enable_bidirectional_attention`), so those inputs come from
bidirectional attention, as they would under a definition of CoDA's own. The quantized model
reloads as Qwen3 with causal flags, which is harmless: it only ever runs through
`diffusion_logits`.
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
    read_native_config,
    read_safetensors,
    resolve_checkpoint_directory,
    save_converted,
    save_sharded,
    torch_dtype,
)

CODA_MODEL_TYPE = "CoDA"
CODA_ARCHITECTURE = "CoDALanguageModel"
# CoDA's save script registers its config class for AutoConfig and its model class for AutoModel
# (not AutoModelForCausalLM) from the modules model_config.py and modeling_coda.py.
CODA_AUTO_MAP = {"AutoConfig": "model_config.CoDAConfig", "AutoModel": "modeling_coda.CoDALanguageModel"}

# The defaults of CoDAConfig.__init__ (CoDA's model_config.py): the CoDA-1.7B configuration.
CODA_CONFIG_DEFAULTS = {
    "vocab_size": 151936,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "max_position_embeddings": 40960,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "max_window_layers": 28,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "mask_token_id": 151669,
    "attention_kernel": "flash_attention",
    "prefix_probability": 0,
    "truncate_probability": 0,
    "block_masking_probability": [0.25, 0.5, 0.5, 0.75, 0.25],
    "mask_block_sizes": [4, 8, 16, 32],
    "sampling_eps": [0.001, 0.25, 0.5, 0.25, 0.001],
}

# A CoDA checkpoint that cannot be loaded raises the error every native format raises.
CodaCheckpointError = NativeCheckpointError


def read_coda_config(directory: Path) -> dict:
    """CoDA's config.json; refuses a checkpoint of another model type."""
    return read_native_config(directory, "CoDA", (CODA_MODEL_TYPE,), (CODA_ARCHITECTURE,))


# --------------------------------------------------------------------------- config and names

def coda_config_to_qwen3(config_dict: dict):
    """The Qwen3Config of a CoDA config.json (a dict); CoDA's defaults fill absent fields.

    Untied lm_head, no sliding window (CoDA's attention has none) and plain rotary embeddings
    (CoDA's code implements no rope scaling). CoDA's training-only fields are dropped; the mask
    token id is kept on the config.
    """
    from transformers import Qwen3Config

    values = {**CODA_CONFIG_DEFAULTS, **config_dict}
    # a config re-saved by a newer transformers may hold the rotary settings as rope_parameters
    rope = values.get("rope_parameters") or values["rope_scaling"] or {}
    if rope and rope.get("rope_type", rope.get("type")) != "default":
        raise NativeCheckpointError(f"CoDA rope_scaling {rope!r} is not supported; allowed: null or rope_type 'default'")
    rope_theta = float(rope.get("rope_theta", values["rope_theta"]))
    config = Qwen3Config(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        num_key_value_heads=values["num_key_value_heads"] or values["num_attention_heads"],
        head_dim=values["head_dim"],
        hidden_act=values["hidden_act"],
        max_position_embeddings=values["max_position_embeddings"],
        initializer_range=values["initializer_range"],
        rms_norm_eps=values["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attention_bias=values["attention_bias"],
        attention_dropout=values["attention_dropout"],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=values["max_window_layers"],
        tie_word_embeddings=False,
        bos_token_id=values["bos_token_id"],
        eos_token_id=values["eos_token_id"],
        pad_token_id=values["pad_token_id"],
        architectures=["Qwen3ForCausalLM"],
    )
    config.mask_token_id = values["mask_token_id"]
    return config


def coda_parameter_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a CoDA checkpoint of this config holds, by name, with its shape.

    The layout of CoDALanguageModel's state dict, written down from CoDA's model code; the
    names are also Qwen3ForCausalLM's (see the module docstring).
    """
    values = {**CODA_CONFIG_DEFAULTS, **config_dict}
    hidden, head_dim = values["hidden_size"], values["head_dim"]
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"] or values["num_attention_heads"]
    intermediate, vocab = values["intermediate_size"], values["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    attention = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
                 "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
    for layer in range(values["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for name, shape in attention.items():
            shapes[f"{prefix}.self_attn.{name}.weight"] = shape
            if values["attention_bias"]:
                shapes[f"{prefix}.self_attn.{name}.bias"] = shape[:1]
        shapes[f"{prefix}.self_attn.q_norm.weight"] = (head_dim,)
        shapes[f"{prefix}.self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# --------------------------------------------------------------------------- loading

def load_coda(path_or_hub_id: str | Path, dtype="bfloat16", device="cpu"):
    """A CoDA checkpoint as an eval-mode Qwen3ForCausalLM (untied lm_head, sdpa attention).

    Reads config.json and the safetensors (single file, shards, or an index), and loads every
    tensor strictly: a missing, unexpected or mis-shaped tensor is an error naming it. Run the
    model through `diffusion_logits` for CoDA's bidirectional attention and logit shift.
    """
    from transformers import Qwen3ForCausalLM

    dtype = torch_dtype(dtype)
    directory = resolve_checkpoint_directory(path_or_hub_id, "CoDA")
    config = coda_config_to_qwen3(read_coda_config(directory))
    return load_into(Qwen3ForCausalLM, config, read_safetensors(directory), directory, "CoDA", dtype).to(device)


def convert_coda_checkpoint(
    path_or_hub_id: str | Path,
    directory: Path,
    dtype="bfloat16",
    expected_mask_token_id: int | None = None,
    source_name: str | None = None,
) -> dict:
    """Write a CoDA checkpoint into `directory` as a standard Qwen3 checkpoint plus tokenizer.

    Returns the `qrobust` marker that is also saved in the checkpoint's config.json: how the
    model must be run (family, mask token id, logit shift) and where it came from
    (`source_name`, default the path or hub id). A mask id given by the caller must agree with
    the checkpoint's.
    """
    source = resolve_checkpoint_directory(path_or_hub_id, "CoDA")
    mask_token_id = {**CODA_CONFIG_DEFAULTS, **read_coda_config(source)}["mask_token_id"]
    if expected_mask_token_id is not None and expected_mask_token_id != mask_token_id:
        raise NativeCheckpointError(
            f"mask_token_id {expected_mask_token_id} given for {str(path_or_hub_id)!r}, "
            f"but its config says {mask_token_id}"
        )
    marker = {
        "family": "diffusion",
        "mask_token_id": mask_token_id,
        "logits_shift": True,
        "converted_from": CODA_MODEL_TYPE,
        "source": source_name or str(path_or_hub_id),
    }
    return save_converted(load_coda(source, dtype, "cpu"), load_coda_tokenizer(source), directory, marker)


def load_coda_tokenizer(directory: Path):
    """The tokenizer of a CoDA checkpoint directory, without CoDA's remote code."""
    return load_tokenizer_without_remote_code(directory)


# --------------------------------------------------------------------------- tiny checkpoints

def write_tiny_coda_checkpoint(
    directory: Path, arch: TinyArchitecture = TinyArchitecture(), seed: int | None = None, shards: int = 1,
    padded_vocab_size: int | None = None, device: str = "cpu", dtype=None
) -> Path:
    """A tiny checkpoint in CoDA's format: CoDA's config.json fields and tensor names, random
    weights (seeded), split into `shards` safetensors files with an index when shards > 1, and
    the project's tiny tokenizer (CoDA's pad / eos / mask token names, small ids, ChatML).

    Declares tie_word_embeddings true, as CoDAConfig does by default, while lm_head holds its
    own weights, as in CoDA's model: a loader that tied would silently compute other logits.
    `padded_vocab_size` gives the embedding and output layers that many rows (a real model's
    vocabulary size: the tokenizer stays small and the extra rows are never produced from text);
    `device` and `dtype` say where the random weights are drawn and how they are stored
    (checkpoints at real sizes are drawn on a GPU and stored in bfloat16).
    """
    from qrobust.tasks.models.tiny import build_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch.vocab_size)
    config = {
        **CODA_CONFIG_DEFAULTS,
        "architectures": [CODA_ARCHITECTURE],
        "auto_map": CODA_AUTO_MAP,
        "model_type": CODA_MODEL_TYPE,
        "vocab_size": max(len(tokenizer), padded_vocab_size or 0),
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "max_position_embeddings": arch.max_position_embeddings,
        "max_window_layers": arch.num_hidden_layers,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "torch_dtype": "float32",
        "transformers_version": "4.47.1",
    }
    generator = random_generator(arch.init_seed if seed is None else seed, device)
    tensors = {name: random_weight(name, shape, generator, dtype=dtype)
               for name, shape in coda_parameter_shapes(config).items()}
    save_sharded(tensors, directory, shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    return directory
