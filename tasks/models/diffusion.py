"""The forward pass of a masked-diffusion language model, in one place.

CoDA, Dream and LLaDA are decoder-only transformers run with bidirectional attention:
every position sees every non-pad position. Everything that runs such a model (the
sampler, the calibration stage, the Hessian's loss, checks after a quantized reload)
goes through `diffusion_logits`, so attention mode, position ids and the logits shift
are decided once. The sampler, which reads only the answer's logits, uses
`diffusion_logits_at`: the same forward, with lm_head applied only at the positions asked
for (at a 768-token answer and batch 32 the full-window logits alone are 9 GB of bf16).

Why an explicit 4-D mask: setting `self_attn.is_causal = False` alone makes attention
bidirectional only while no padding mask is passed; given a 2-D mask with a pad,
transformers builds a causal+padding mask. A prepared 4-D mask is used as-is, and it
also survives a reload (gptqmodel restores `is_causal = True` on reload).

Why no mask at all when nothing is padded: sdpa cannot use its flash kernel with an
explicit mask. With no mask, every attention module's `is_causal = False` (set again on
every call, since a reload restores True) is what makes attention bidirectional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bidirectional_attention_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Full (non-causal) attention mask [B, 1, L, L] from a 2-D padding mask [B, L].

    Every real query attends to every real key. Pad queries attend to every key, so their
    softmax has at least one finite entry and no NaN appears (their outputs are unused).

    With `dtype=torch.bool` the result is True where attention is allowed (the form sdpa
    takes). With a floating dtype it is the additive form: 0 where allowed, the dtype's most
    negative finite value where not (the form eager attention adds to its scores).
    """
    is_real = attention_mask.bool()
    key_is_real = is_real[:, None, None, :]
    query_is_pad = ~is_real[:, None, :, None]
    allowed = key_is_real | query_is_pad
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"mask dtype must be torch.bool or floating, got {dtype}")
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] that start at 0 on each row's first real token (left padding).

    Pad positions get 0; their outputs are never used.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def enable_bidirectional_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Mark every attention module and the config of `model` as non-causal; returns it.

    `diffusion_logits` does not need this (it passes a 4-D mask). Forwards that build
    their own mask from a 2-D padding mask do, e.g. the layer-input capture of a GPTQ
    run: transformers (checked with 5.24) builds a bidirectional padding mask when
    `config.is_causal` is False, while the module flags alone fall back to causal as
    soon as a pad is present. Idempotent; the config flag is saved with the model.
    """
    _mark_attention_modules_non_causal(model)
    config = getattr(model, "config", None)
    if config is not None:
        config.is_causal = False
    return model


def _mark_attention_modules_non_causal(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if name.endswith("self_attn") and hasattr(module, "is_causal"):
            module.is_causal = False


def diffusion_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_shift: bool = True,
) -> torch.Tensor:
    """Logits [B, L, V] of a decoder run with bidirectional attention over non-pad tokens.

    Works for any HF decoder that accepts a prepared 4-D mask and position ids
    (Qwen3ForCausalLM and the like, also after a gptqmodel reload). Rows may be padded on
    either side; the real tokens of a row get the same logits whatever its padding and
    whatever else is in the batch.

    With `logits_shift=True` (CoDA, Dream) output position i holds the model's logits at
    position i-1, i.e. the prediction for token i (see `shift_logits_right` for a row's
    first real token). LLaDA uses `logits_shift=False`.
    """
    output = model(use_cache=False, **_bidirectional_inputs(model, input_ids, attention_mask))
    logits = output.logits if hasattr(output, "logits") else output[0]
    return shift_logits_right(logits, attention_mask) if logits_shift else logits


def diffusion_logits_at(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    logits_shift: bool = True,
) -> torch.Tensor:
    """`diffusion_logits(...)[b, positions[b]]` for each row b: logits [B, K, V] at the
    positions [B, K] asked for, with lm_head applied there alone.

    The backbone (`model.base_model`) runs on the whole sequence; lm_head
    (`model.get_output_embeddings()`) sees only the hidden states the positions read, which,
    with `logits_shift`, are those of each position's previous real token.
    """
    backbone, head = _backbone_and_head(model)
    output = backbone(use_cache=False, **_bidirectional_inputs(model, input_ids, attention_mask))
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    sources = shift_source_positions(attention_mask).gather(1, positions) if logits_shift else positions
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return head(hidden[rows, sources])


def pads_visible_logits_at(
    model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, logits_shift: bool = True
) -> torch.Tensor:
    """`diffusion_logits_at` as CoDA's own forward computes it, for reproducing its published
    harness: CoDA's model ignores the attention mask it is given, so every position, pads
    included, attends to every position, position ids run 0..L-1 from the first column (a
    left-padded row's first pad), and the shift takes each position's logits from the column
    before it. A row without pads gets exactly what `diffusion_logits_at` gives it."""
    return diffusion_logits_at(model, input_ids, torch.ones_like(input_ids), positions, logits_shift)


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        raise ValueError(f"{type(model).__name__} has no separate backbone and lm_head; use diffusion_logits")
    return backbone, head


def _bidirectional_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    """Forward keyword arguments that make attention bidirectional over the real tokens.

    Under sdpa a batch without padding gets no mask, so that sdpa may choose its flash or
    memory-efficient kernels; the non-causal module flags then decide (set on every call,
    as a gptqmodel reload restores True). Eager attention ignores those flags and builds a
    causal mask, so it, and any padded batch, gets the explicit 4-D mask. The config flag
    is left to enable_bidirectional_attention, so that bidirectionality here does not vary
    with the transformers version. Deciding costs one host synchronisation.
    """
    _mark_attention_modules_non_causal(model)
    mask_dtype = _mask_dtype_for(model)
    unpadded = mask_dtype == torch.bool and bool(attention_mask.bool().all())
    return {
        "input_ids": input_ids,
        "attention_mask": None if unpadded else bidirectional_attention_mask(attention_mask, mask_dtype),
        "position_ids": position_ids_from_mask(attention_mask),
    }


def shift_logits_right(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real position takes the logits of the real position before it, so that it
    scores its own token (Dream's `cat([logits[:, :1], logits[:, :-1]])` on an unpadded row).

    Pads are skipped, so a padded row is shifted exactly as it would be alone: a row's first
    real token keeps its own logits, as position 0 does in an unpadded row, and the first
    token after a run of pads looks past them.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, shift_source_positions(attention_mask)]


def shift_source_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, L]: the position whose logits `shift_logits_right` puts at each position
    (the previous real position; a row's first real token, and pads before it, keep their own)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    real_positions = torch.where(attention_mask.bool(), positions, -1)
    previous_real = F.pad(real_positions.cummax(dim=1).values[:, :-1], (1, 0), value=-1)
    return torch.where(previous_real >= 0, previous_real, positions)


def _mask_dtype_for(model: torch.nn.Module) -> torch.dtype:
    """sdpa takes a boolean mask; eager attention adds the mask to its scores."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return torch.bool
    if "flash" in implementation:
        raise ValueError(
            f"attention implementation {implementation!r} takes no 4-D mask; load the model with sdpa or eager"
        )
    return _floating_dtype(model)


def _floating_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    raise ValueError("model has no floating-point parameters to take the mask dtype from")


def mask_tokens(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_ratio: torch.Tensor | float,
    mask_token_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable position by `mask_token_id` independently with its row's ratio.

    `loss_mask` [B, L] marks the positions that may be masked; `mask_ratio` is a float or a
    tensor [B] of per-row probabilities. Returns (masked_ids, masked_positions), both [B, L].
    """
    ratio = torch.as_tensor(mask_ratio, dtype=torch.float32, device=input_ids.device)
    ratio = ratio.reshape(-1, 1) if ratio.ndim else ratio
    uniform = _uniform(input_ids.shape, generator, input_ids.device)
    masked_positions = loss_mask.bool() & (uniform < ratio)
    masked_ids = input_ids.masked_fill(masked_positions, mask_token_id)
    return masked_ids, masked_positions


def masked_diffusion_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    logits_shift: bool = True,
) -> torch.Tensor:
    """Masked-denoising loss (the diffusion model's training objective), a scalar.

    Each row b draws t_b ~ U(eps, 1]; every position where `loss_mask` is True (and the
    token is not padding) is masked independently with probability t_b. With CE the
    cross-entropy of the true token from the logits of the masked input:

        loss = sum_b sum_{i masked in b} CE(b, i) / t_b  /  N

    where N is the number of loss positions in the batch (True in `loss_mask` and not pad,
    whether or not masked this draw); N is clamped to at least 1. This is the Monte-Carlo
    estimate of the per-token negative ELBO used to train LLaDA / Dream / CoDA. A draw that
    masks nothing gives 0. Differentiable in the model's parameters.
    """
    loss_positions = loss_mask.bool() & attention_mask.bool()
    t = eps + (1.0 - eps) * (1.0 - _uniform((input_ids.shape[0],), generator, input_ids.device))
    masked_ids, masked_positions = mask_tokens(input_ids, loss_positions, t, mask_token_id, generator)
    logits = diffusion_logits(model, masked_ids, attention_mask, logits_shift)
    cross_entropy = F.cross_entropy(
        logits[masked_positions].float(), input_ids[masked_positions], reduction="none"
    )
    inverse_t = (1.0 / t)[:, None].expand_as(masked_positions)[masked_positions]
    return (cross_entropy * inverse_t).sum() / loss_positions.sum().clamp(min=1)


def _uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) in float32 drawn from `generator` on its own device, then moved to `device`. The
    dtype is explicit: torch's default dtype is process-wide, and a model loading in another
    thread sets it to the model's for a while, which would change the draws."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


@torch.no_grad()
def attention_is_bidirectional(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    through_diffusion_logits: bool = True,
    atol: float = 1e-6,
) -> bool:
    """True if changing each row's last token changes the logits at its first real position.

    A causal model cannot pass: the first position sees only itself. The default probe is a
    two-row batch whose second row is left padded, because padding is what breaks the
    flag-only route. With `through_diffusion_logits=False` the model's own forward with the
    2-D mask is probed instead (what HF generate or a calibration hook would run).
    """
    device = next(model.parameters()).device
    if input_ids is None:
        input_ids, attention_mask = _padded_probe(model.config.vocab_size, device)
    elif attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vocab_size = model.config.vocab_size
    perturbed = input_ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % vocab_size

    def first_position_logits(ids: torch.Tensor) -> torch.Tensor:
        if through_diffusion_logits:
            logits = diffusion_logits(model, ids, attention_mask, logits_shift=False)
        else:
            output = model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
            logits = output.logits if hasattr(output, "logits") else output[0]
        first_real = attention_mask.long().argmax(dim=1)
        return logits[torch.arange(ids.shape[0], device=ids.device), first_real].float()

    change = (first_position_logits(input_ids) - first_position_logits(perturbed)).abs()
    return bool((change.amax(dim=-1) > atol).all())


def _padded_probe(vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 8), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask
