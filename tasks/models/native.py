"""What reading a checkpoint in its authors' own format takes, whatever the format.

Dream and LLaDA (like CoDA, `tasks.models.coda`) publish weights that only their own modeling
code reads (`trust_remote_code`), written for older transformers. qrobust never runs that code:
each format's module (`tasks.models.dream`, `tasks.models.llada`) reads the format's
config.json and safetensors itself, maps them onto the transformers architecture that computes
the same function, and the prepare-model stage saves the result once as a standard checkpoint
marked with how to run it. This module holds the parts the formats share: finding the files,
reading the config and the tensors, a strict name-and-shape check that names every difference,
loading into a model built on the meta device, the tokenizer without remote code, and the
random tiny checkpoints the tests and CPU grids use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# What a hub download fetches: configs, weights and tokenizer files; never the remote code.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
LISTED_KEYS = 5  # how many offending names an error message shows


class NativeCheckpointError(ValueError):
    """A checkpoint is not loadable in the format it was read as; the message is one line naming why."""


# --------------------------------------------------------------------------- files

def resolve_checkpoint_directory(path_or_hub_id: str | Path, format_name: str) -> Path:
    """A local checkpoint directory, or the snapshot of a hub id (downloaded on first use)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"{format_name} checkpoint directory {text!r} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=HUB_FILE_PATTERNS))


def read_native_config(directory: Path, format_name: str, model_types: tuple[str, ...],
                       architectures: tuple[str, ...]) -> dict:
    """The checkpoint's config.json; refuses one whose model_type and architectures are another format's."""
    file = Path(directory) / "config.json"
    if not file.exists():
        raise NativeCheckpointError(f"{str(directory)!r} has no config.json")
    config = json.loads(file.read_text())
    model_type = config.get("model_type")
    declared = config.get("architectures") or []
    if model_type not in model_types and not set(declared) & set(architectures):
        raise NativeCheckpointError(
            f"{str(directory)!r} is not a {format_name} checkpoint: model_type {model_type!r}, architectures "
            f"{declared!r}; expected model_type {' or '.join(map(repr, model_types))} or architecture "
            f"{' or '.join(map(repr, architectures))}"
        )
    return config


def read_safetensors(directory: Path) -> dict:
    """Every tensor of a checkpoint: the files its index lists, else every *.safetensors file."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise NativeCheckpointError(f"{str(directory)!r} holds no *.safetensors weights")
    tensors = {}
    for file in files:
        with safe_open(file, "pt") as opened:
            for key in opened.keys():
                if key in tensors:
                    raise NativeCheckpointError(f"tensor {key!r} appears in more than one file of {str(directory)!r}")
                tensors[key] = opened.get_tensor(key)
    return tensors


def check_names_and_shapes(found: dict[str, tuple], expected: dict[str, tuple], directory: Path,
                           format_name: str) -> None:
    """One error naming the missing, unexpected and mis-shaped tensors, if there are any."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing:
        problems.append(f"missing {len(missing)} key(s): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {listed(unexpected)}")
    if misshaped:
        shown = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in misshaped[:LISTED_KEYS]]
        problems.append(f"{len(misshaped)} shape mismatch(es): {', '.join(shown)}")
    if problems:
        raise NativeCheckpointError(
            f"{format_name} checkpoint {str(directory)!r} does not fit its config: {'; '.join(problems)}"
        )


def listed(names: list[str]) -> str:
    more = f" and {len(names) - LISTED_KEYS} more" if len(names) > LISTED_KEYS else ""
    return ", ".join(names[:LISTED_KEYS]) + more


def refuse_unsupported(config: dict, supported: dict, format_name: str) -> None:
    """Refuse, in one line, a config whose settings the target architecture cannot compute.

    `supported` maps a config key to the values the conversion reproduces exactly; a key the
    config leaves out takes the format's default, which the caller has merged in already.
    """
    for key, allowed in supported.items():
        if config.get(key) not in allowed:
            raise NativeCheckpointError(
                f"{format_name} setting {key} = {config.get(key)!r} is not supported: the converted model would "
                f"compute another function; supported: {', '.join(map(repr, allowed))}"
            )


# --------------------------------------------------------------------------- models

def load_into(model_class, config, tensors: dict, directory: Path, format_name: str, dtype):
    """`model_class(config)` holding exactly `tensors` (already renamed to its names), in eval mode.

    The model is built on the meta device and every tensor is assigned strictly: a missing,
    unexpected or mis-shaped tensor is an error naming it. The rotary table, a computed buffer
    no checkpoint saves, is then built for real.
    """
    import torch

    config.dtype = dtype
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_names_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, expected, directory, format_name)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise NativeCheckpointError(f"tensors left uninitialised after loading {str(directory)!r}: {listed(leftovers)}")
    return model.eval()


def state_dict_names_and_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """The tensors a transformers model of `config` saves, by name, with their shapes (built on meta)."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(allowed)}")
    return allowed[dtype]


def save_converted(model, tokenizer, directory: Path, marker: dict) -> dict:
    """Save a converted model and its tokenizer as a standard checkpoint marked with how to run it."""
    model.config.qrobust = marker
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return marker


# --------------------------------------------------------------------------- tokenizers

def load_tokenizer_without_remote_code(directory: Path, tokenizer_config_changes: dict | None = None):
    """The tokenizer of a native checkpoint, loaded by transformers' own classes.

    Loaded from a view of the directory without config.json (whose auto_map points at the
    authors' code, which AutoTokenizer would ask to run) nor any *.py file. With
    `tokenizer_config_changes`, tokenizer_config.json is rewritten in the view (e.g. Dream names
    its own tokenizer class, a copy of Qwen2's; the view names Qwen2's).
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as view:
        for file in Path(directory).iterdir():
            if file.is_file() and file.name != "config.json" and file.suffix not in (".safetensors", ".py"):
                shutil.copy(file, view)
        if tokenizer_config_changes:
            path = Path(view) / "tokenizer_config.json"
            settings = json.loads(path.read_text()) if path.exists() else {}
            for key, value in tokenizer_config_changes.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value
            path.write_text(json.dumps(settings, indent=2))
        return AutoTokenizer.from_pretrained(view)


# --------------------------------------------------------------------------- tiny checkpoints

def random_weight(name: str, shape: tuple[int, ...], generator, output_scale: float = 1.0, dtype=None):
    """Norm gains near 1, embeddings and biases of unit scale, projections scaled by
    1/sqrt(fan-in), so every tensor visibly shapes the logits; the output projection is
    multiplied by `output_scale`. Drawn on the generator's device, then cast to `dtype`."""
    import torch

    values = torch.randn(shape, generator=generator, device=generator.device)
    if len(shape) == 1:
        values = 1.0 + 0.1 * values if "norm" in name or "ln_f" in name else 0.1 * values
    elif not ("embed" in name or name.endswith("wte.weight")):
        values = output_scale * values / shape[1] ** 0.5
    return values if dtype is None else values.to(dtype)


def require_heads_span_hidden(arch, format_name: str) -> None:
    """A tiny checkpoint of a format whose attention width is the hidden size needs
    hidden_size = num_attention_heads x head_dim."""
    if arch.num_attention_heads * arch.head_dim != arch.hidden_size:
        raise NativeCheckpointError(
            f"a {format_name}-format tiny model needs hidden_size = num_attention_heads x head_dim, got "
            f"{arch.hidden_size} != {arch.num_attention_heads} x {arch.head_dim}"
        )


def random_generator(seed: int, device: str = "cpu"):
    """The seeded generator the random-weight checkpoint writers draw from (CPU for tiny models,
    a GPU for checkpoints at real sizes, where drawing billions of values on a CPU takes minutes)."""
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def save_sharded(tensors: dict, directory: Path, shards: int) -> None:
    """Safetensors files as the hub shards them: one file, or `shards` files and an index."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: tensor.contiguous().cpu() for name, tensor in tensors.items()}
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[index::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
