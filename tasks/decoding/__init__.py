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


# One answer window of tokens per row, the longest the grids ask for (CoDA's published 768 plus a prompt).
WINDOW_TOKENS = 2048
CPU_BATCH = 8


def rows_that_fit(device: str, bytes_per_token: int, cap: int) -> int:
    """The largest power of two up to `cap` whose rows of WINDOW_TOKENS tokens, at `bytes_per_token`,
    fit in half the device's free memory (the other half for activations and the allocator)."""
    if not device.startswith("cuda"):
        return CPU_BATCH
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    rows = max(1, int(free // 2 // (bytes_per_token * WINDOW_TOKENS)))
    return min(cap, 1 << (rows.bit_length() - 1))
