"""Random-weight checkpoints at the real configurations of the grids' hub models.

For GPU nodes that cannot reach the hub: the pipeline's speed, memory and kernel choices depend
on the shapes, not on the weight values, so `qrobust run GRID --models-from DIR` (or
`qrobust bench`) over these folders measures what the real models would cost. Each folder is in
the format its loader reads from the hub (Hugging Face Qwen3 for Qwen3, CoDA's, Dream's and
LLaDA's own formats for theirs), with the project's small offline tokenizer: token ids past the
tokenizer's size exist in the embedding but are never produced from text, and answers are noise.

    python -m qrobust.tools.random_checkpoints /models --models qwen3-1.7b,coda-1.7b --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from qrobust.tasks.config import TinyArchitecture

TOKENIZER_VOCAB = 1024


@dataclass(frozen=True)
class RealShape:
    """A published model's layer sizes; `family` names the checkpoint format written."""

    family: str
    hub_id: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    mask_token_id: int | None = None  # diffusion models: the real id, which their presets check

    def architecture(self, seed: int) -> TinyArchitecture:
        return TinyArchitecture(
            vocab_size=TOKENIZER_VOCAB, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, init_seed=seed,
        )


# From each model's config.json on the hub; keys are the grids' model names.
REAL_SHAPES = {
    "qwen3-1.7b": RealShape("qwen3", "Qwen/Qwen3-1.7B", 2048, 6144, 28, 16, 8, 128, 151936, 40960),
    "coda-1.7b": RealShape("coda", "Salesforce/CoDA-v0-Instruct", 2048, 6144, 28, 16, 8, 128, 151936, 40960, 151669),
    "dream-7b": RealShape("dream", "Dream-org/Dream-v0-Instruct-7B", 3584, 18944, 28, 28, 4, 128, 152064, 131072,
                          151666),
    "llada-8b": RealShape("llada", "GSAI-ML/LLaDA-8B-Instruct", 4096, 12288, 32, 32, 32, 128, 126464, 4096, 126336),
}

NATIVE_WRITERS = {
    "coda": ("qrobust.tasks.models.coda", "write_tiny_coda_checkpoint"),
    "dream": ("qrobust.tasks.models.dream", "write_tiny_dream_checkpoint"),
    "llada": ("qrobust.tasks.models.llada", "write_tiny_llada_checkpoint"),
}


def write_random_checkpoint(model: str | RealShape, directory: Path, device: str = "cpu", dtype: str = "bfloat16",
                            seed: int = 0, layers: int | None = None) -> Path:
    """Write `model` (a name of REAL_SHAPES, or a shape), with random weights, into `directory`;
    `layers` keeps only that many decoder layers (real widths, for a quick check of a whole run)."""
    import torch

    if isinstance(model, str) and model not in REAL_SHAPES:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(REAL_SHAPES)}")
    shape = REAL_SHAPES[model] if isinstance(model, str) else model
    arch = shape.architecture(seed)
    if layers is not None:
        arch = dataclasses.replace(arch, num_hidden_layers=layers)
    torch_dtype = getattr(torch, dtype)
    directory = Path(directory)
    if shape.family == "qwen3":
        return _write_qwen3(arch, shape.vocab_size, directory, device, torch_dtype)
    module, function = NATIVE_WRITERS[shape.family]
    write = getattr(importlib.import_module(module), function)
    write(directory, arch, padded_vocab_size=shape.vocab_size, device=device, dtype=torch_dtype)
    config = json.loads((directory / "config.json").read_text())
    if shape.mask_token_id is not None and shape.mask_token_id != config["mask_token_id"]:
        _move_token_id(directory, config["mask_token_id"], shape.mask_token_id)
        (directory / "config.json").write_text(json.dumps({**config, "mask_token_id": shape.mask_token_id}, indent=2))
    return directory


def _move_token_id(directory: Path, old_id: int, new_id: int) -> None:
    """Give the tokenizer's token `old_id` the id `new_id` in every tokenizer file of `directory`,
    so that the mask token sits at its real id, which the diffusion loaders check against config."""
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.exists():
        # An added token keeps no id of its own past the others: the token moves into the model's
        # vocabulary, which takes any id.
        data = json.loads(tokenizer_json.read_text())
        vocab = data["model"]["vocab"]
        for entry in [e for e in data.get("added_tokens", []) if e["id"] == old_id]:
            data["added_tokens"].remove(entry)
            vocab[entry["content"]] = old_id
        _rekey(vocab, old_id, new_id)
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
    for name in ("vocab.json", "added_tokens.json"):
        path = directory / name
        if path.exists():
            table = json.loads(path.read_text())
            _rekey(table, old_id, new_id)
            path.write_text(json.dumps(table, ensure_ascii=False))
    settings_path = directory / "tokenizer_config.json"
    if settings_path.exists():
        settings = json.loads(settings_path.read_text())
        decoder = settings.get("added_tokens_decoder", {})
        if str(old_id) in decoder:
            decoder[str(new_id)] = decoder.pop(str(old_id))
        settings_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))


def _rekey(token_ids: dict, old_id: int, new_id: int) -> None:
    for token, token_id in token_ids.items():
        if token_id == old_id:
            token_ids[token] = new_id


def _write_qwen3(arch: TinyArchitecture, vocab_size: int, directory: Path, device: str, dtype) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qrobust.tasks.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(arch.vocab_size)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=True, rope_theta=1_000_000,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(arch.init_seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="each model goes to DIRECTORY/<model name>")
    parser.add_argument("--models", default=",".join(REAL_SHAPES),
                        help=f"comma-separated, from: {', '.join(REAL_SHAPES)}")
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cuda: much faster)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers (a quick check)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in REAL_SHAPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; allowed: {', '.join(REAL_SHAPES)}")
    for name in names:
        started = time.perf_counter()
        directory = write_random_checkpoint(name, args.directory / name, args.device, args.dtype, args.seed,
                                            args.layers)
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        config = json.loads((directory / "config.json").read_text())
        print(f"{name}: {directory} ({size / 1e9:.2f} GB, vocab {config.get('vocab_size')}, "
              f"{time.perf_counter() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
