"""Auto-regressive decoding of a batch of prompts (greedy or sampled)."""

from __future__ import annotations


def answers(model, tokenizer, prompts: list[str], generation, checkpoint, seed: int, stop_strings: tuple[str, ...]):
    """Answers to a batch of prompts, decoded left to right: (texts, generated token counts)."""
    g = generation
    return ar_generate(model, tokenizer, prompts, g.max_new_tokens, g.temperature, g.top_p, g.top_k, seed, stop_strings)


def ar_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                top_p: float | None, top_k: int | None, seed: int, stop_strings: tuple[str, ...]):
    """Decode a batch; returns (texts, generated token counts)."""
    import torch

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = temperature > 0
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if sampling:
        options |= dict(temperature=temperature, top_p=top_p or 1.0, top_k=top_k or 0)
    else:
        options |= dict(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        options |= dict(stop_strings=list(stop_strings), tokenizer=tokenizer)
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**encoded, **options)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    texts, counts = [], []
    for row in new_tokens.tolist():
        tokens = _until_end(row, {tokenizer.eos_token_id, tokenizer.pad_token_id})
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
        counts.append(len(tokens))
    return texts, counts


def _until_end(tokens: list[int], end_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in end_ids:
            return tokens[:index]
    return tokens
