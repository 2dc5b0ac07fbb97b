"""Decoding algorithms, one module per model family: left to right (`ar`) and masked diffusion.

Each family's module has `answers(model, tokenizer, prompts, generation, checkpoint, seed,
stop_strings) -> (texts, token counts)`. The generation stage finds it here by the
checkpoint's family, so a shard's cache key covers its own family's decoder only.
"""

from __future__ import annotations

import importlib

DECODERS = {
    "ar": "qrobust.tasks.decoding.ar",
    "diffusion": "qrobust.tasks.decoding.diffusion",
}


def decoder_module(family: str) -> str:
    if family not in DECODERS:
        raise ValueError(f"no decoder for model family {family!r}; allowed: {', '.join(DECODERS)}")
    return DECODERS[family]


def decoder(family: str):
    """The decoding module of a model family."""
    return importlib.import_module(decoder_module(family))
