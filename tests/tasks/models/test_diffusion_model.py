import types

import pytest
import torch
import torch.nn.functional as F

from qrobust.tasks.models.diffusion import (
    attention_is_bidirectional,
    bidirectional_attention_mask,
    diffusion_logits,
    diffusion_logits_at,
    enable_bidirectional_attention,
    mask_tokens,
    masked_diffusion_loss,
    position_ids_from_mask,
    shift_logits_right,
)

VOCAB = 128
MASK_ID = 127


def tiny_qwen3(attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    config._attn_implementation = attn_implementation
    return Qwen3ForCausalLM(config).eval()


def padded_batch():
    """Row 0 has 8 real tokens; row 1 has 5, left padded by 3."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, MASK_ID, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


class PositionTableModel(torch.nn.Module):
    """Logits depend only on the position (a learnable table), and the inputs it saw are
    kept, so a test can tell which positions were masked and where gradient flows."""

    def __init__(self, length: int, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(length, vocab))
        self.seen_input_ids = None

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        self.seen_input_ids = input_ids.clone()
        return types.SimpleNamespace(logits=self.table.expand(input_ids.shape[0], -1, -1))


def test_mask_lets_real_queries_see_every_real_key_and_no_pad():
    mask = bidirectional_attention_mask(torch.tensor([[0, 1, 1]]))
    expected = torch.tensor([[True, True, True], [False, True, True], [False, True, True]])
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


def test_additive_mask_is_zero_where_allowed_and_most_negative_elsewhere():
    mask = bidirectional_attention_mask(torch.tensor([[0, 1]]), torch.float32)
    minimum = torch.finfo(torch.float32).min
    assert torch.equal(mask[0, 0], torch.tensor([[0.0, 0.0], [minimum, 0.0]]))


def test_position_ids_start_at_each_rows_first_real_token():
    positions = position_ids_from_mask(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_changing_last_token_changes_first_real_position_with_padding(attn_implementation):
    model = tiny_qwen3(attn_implementation)
    input_ids, attention_mask = padded_batch()
    perturbed = input_ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % MASK_ID
    with torch.no_grad():
        before = diffusion_logits(model, input_ids, attention_mask, logits_shift=False)
        after = diffusion_logits(model, perturbed, attention_mask, logits_shift=False)
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4
    assert (before[1, 3] - after[1, 3]).abs().max() > 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_row_gets_the_logits_it_gets_alone(attn_implementation):
    model = tiny_qwen3(attn_implementation)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        batched = diffusion_logits(model, input_ids, attention_mask)
        alone = diffusion_logits(model, input_ids[1:, 3:], attention_mask[1:, 3:])
    torch.testing.assert_close(batched[1, 3:], alone[0], atol=1e-5, rtol=0)


def test_right_padded_row_gets_the_logits_it_gets_alone():
    model = tiny_qwen3()
    input_ids, _ = padded_batch()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        batched = diffusion_logits(model, input_ids, attention_mask)
        alone = diffusion_logits(model, input_ids[1:, :5], attention_mask[1:, :5])
    torch.testing.assert_close(batched[1, :5], alone[0], atol=1e-5, rtol=0)


def test_sdpa_and_eager_attention_give_the_same_logits():
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        sdpa = diffusion_logits(tiny_qwen3("sdpa"), input_ids, attention_mask)
        eager = diffusion_logits(tiny_qwen3("eager"), input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], atol=1e-5, rtol=0)


def test_fully_padded_row_gives_finite_logits():
    model = tiny_qwen3()
    input_ids, attention_mask = padded_batch()
    attention_mask[1] = 0
    with torch.no_grad():
        assert torch.isfinite(diffusion_logits(model, input_ids, attention_mask)).all()


def test_shifted_logits_at_position_i_are_the_models_logits_at_i_minus_1_within_the_row():
    model = tiny_qwen3()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        shifted = diffusion_logits(model, input_ids, attention_mask, logits_shift=True)
        unshifted = diffusion_logits(model, input_ids, attention_mask, logits_shift=False)
    # row 0 is unpadded: the plain shift, position 0 keeps its own logits
    assert torch.equal(shifted[0, 1:], unshifted[0, :-1])
    assert torch.equal(shifted[0, 0], unshifted[0, 0])
    # row 1 starts at 3: its first real token keeps its own logits, never a pad's
    assert torch.equal(shifted[1, 4:], unshifted[1, 3:-1])
    assert torch.equal(shifted[1, 3], unshifted[1, 3])


def test_shift_takes_each_real_positions_logits_from_the_previous_real_position():
    logits = torch.arange(5.0).expand(3, -1)[..., None]  # logits[b, i] = i
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 1, 1]])
    sources = shift_logits_right(logits, attention_mask)[..., 0]
    assert sources[0].tolist() == [0, 0, 1, 2, 3]
    assert sources[1, 2:].tolist() == [2, 2, 3]
    assert sources[2, [0, 3, 4]].tolist() == [0, 0, 3]


def test_plain_forward_with_padding_is_causal_and_the_check_says_so():
    model = tiny_qwen3()
    assert not attention_is_bidirectional(model, through_diffusion_logits=False)
    assert attention_is_bidirectional(model)


def test_model_reloaded_with_causal_flags_is_bidirectional_through_the_4d_mask():
    model = tiny_qwen3()
    for layer in model.model.layers:
        layer.self_attn.is_causal = True
    input_ids, attention_mask = padded_batch()
    perturbed = input_ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % MASK_ID
    mask = bidirectional_attention_mask(attention_mask)
    positions = position_ids_from_mask(attention_mask)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        after = model(input_ids=perturbed, attention_mask=mask, position_ids=positions).logits
    assert (before[1, 3] - after[1, 3]).abs().max() > 1e-4


def test_enabling_sets_every_attention_flag_and_the_config_flag():
    model = enable_bidirectional_attention(tiny_qwen3())
    assert all(layer.self_attn.is_causal is False for layer in model.model.layers)
    assert model.config.is_causal is False
    assert attention_is_bidirectional(model, through_diffusion_logits=False)


def test_flash_attention_is_refused_with_a_clear_error():
    model = tiny_qwen3()
    model.config._attn_implementation = "flash_attention_2"
    input_ids, attention_mask = padded_batch()
    with pytest.raises(ValueError, match="flash_attention_2"):
        diffusion_logits(model, input_ids, attention_mask)


def right_padded_batch():
    input_ids, _ = padded_batch()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask


def unpadded_batch():
    input_ids, _ = padded_batch()
    return input_ids, torch.ones_like(input_ids)


def reset_to_causal(model):
    """What a gptqmodel reload does to the attention flags."""
    for layer in model.model.layers:
        layer.self_attn.is_causal = True
    return model


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [padded_batch, right_padded_batch, unpadded_batch])
@pytest.mark.parametrize("logits_shift", [True, False])
def test_logits_at_positions_equal_the_full_logits_there(attn_implementation, batch, logits_shift):
    model = tiny_qwen3(attn_implementation).float()
    input_ids, attention_mask = batch()
    positions = torch.tensor([[7, 2, 5], [4, 6, 7]])
    with torch.no_grad():
        full = diffusion_logits(model, input_ids, attention_mask, logits_shift)
        selected = diffusion_logits_at(model, input_ids, attention_mask, positions, logits_shift)
    assert selected.shape == (2, 3, VOCAB)
    torch.testing.assert_close(selected, full[torch.arange(2)[:, None], positions], atol=1e-5, rtol=0)


def attention_mask_seen_by_the_backbone(model, input_ids, attention_mask):
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        diffusion_logits(model, input_ids, attention_mask)
    handle.remove()
    return seen[0]


def test_unpadded_sdpa_batch_runs_without_a_mask_and_padded_batches_with_the_4d_mask():
    model = tiny_qwen3("sdpa")
    assert attention_mask_seen_by_the_backbone(model, *unpadded_batch()) is None
    assert attention_mask_seen_by_the_backbone(model, *padded_batch()).shape == (2, 1, 8, 8)
    assert attention_mask_seen_by_the_backbone(tiny_qwen3("eager"), *unpadded_batch()).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [padded_batch, unpadded_batch])
def test_both_logits_functions_stay_bidirectional_after_flags_are_reset_to_causal(attn_implementation, batch):
    model = reset_to_causal(tiny_qwen3(attn_implementation))
    input_ids, attention_mask = batch()
    assert attention_is_bidirectional(model, input_ids, attention_mask)
    perturbed = input_ids.clone()
    perturbed[:, -1] = (perturbed[:, -1] + 1) % MASK_ID
    first_real = attention_mask.argmax(dim=1, keepdim=True)
    with torch.no_grad():
        reset_to_causal(model)
        before = diffusion_logits_at(model, input_ids, attention_mask, first_real, logits_shift=False)
        reset_to_causal(model)
        after = diffusion_logits_at(model, perturbed, attention_mask, first_real, logits_shift=False)
    assert ((before - after).abs().amax(dim=-1) > 1e-4).all()


def test_logits_at_positions_refuses_a_model_without_a_separate_head():
    model = PositionTableModel(8, VOCAB)
    input_ids, attention_mask = unpadded_batch()
    with pytest.raises(ValueError, match="PositionTableModel has no separate backbone and lm_head"):
        diffusion_logits_at(model, input_ids, attention_mask, torch.zeros((2, 1), dtype=torch.long))


def test_mask_tokens_masks_about_the_ratio_and_only_inside_loss_mask():
    input_ids = torch.randint(0, MASK_ID, (2, 4000), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, 1000:] = True
    ratio = torch.tensor([0.3, 0.8])
    masked_ids, masked = mask_tokens(input_ids, loss_mask, ratio, MASK_ID, torch.Generator().manual_seed(0))
    fractions = masked[:, 1000:].float().mean(dim=1)
    assert torch.allclose(fractions, ratio, atol=0.03)
    assert not masked[:, :1000].any()
    assert torch.equal(masked_ids == MASK_ID, masked)
    assert torch.equal(masked_ids[~masked], input_ids[~masked])


def test_mask_tokens_at_ratio_one_masks_exactly_the_loss_mask():
    input_ids = torch.randint(0, MASK_ID, (3, 10), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    _, masked = mask_tokens(input_ids, loss_mask, 1.0, MASK_ID, torch.Generator().manual_seed(0))
    assert torch.equal(masked, loss_mask)


def test_loss_is_finite_positive_and_repeatable_for_a_seeded_generator():
    model = tiny_qwen3()
    input_ids, attention_mask = padded_batch()
    loss_mask = attention_mask.bool()

    def loss(seed):
        generator = torch.Generator().manual_seed(seed)
        return masked_diffusion_loss(model, input_ids, attention_mask, loss_mask, MASK_ID, generator)

    first, second, other_seed = loss(0), loss(0), loss(5)
    assert torch.isfinite(first) and first > 0
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_loss_gradient_reaches_only_masked_positions():
    model = PositionTableModel(length=12, vocab=VOCAB)
    input_ids = torch.randint(0, MASK_ID, (1, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[0, 4:] = True
    generator = torch.Generator().manual_seed(3)
    masked_diffusion_loss(model, input_ids, attention_mask, loss_mask, MASK_ID, generator, logits_shift=False).backward()
    masked = model.seen_input_ids[0] == MASK_ID
    has_gradient = model.table.grad.abs().sum(dim=-1) > 0
    assert masked.any() and not masked[:4].any()
    assert torch.equal(has_gradient, masked)


def test_loss_with_everything_masked_is_mean_cross_entropy_over_loss_positions():
    # eps close to 1 forces t ~ 1: every loss position is masked and weighted 1/t ~ 1.
    model = PositionTableModel(length=6, vocab=VOCAB)
    input_ids = torch.randint(0, MASK_ID, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)  # pads are excluded anyway
    loss_mask[0, 0] = False
    generator = torch.Generator().manual_seed(0)
    loss = masked_diffusion_loss(
        model, input_ids, attention_mask, loss_mask, MASK_ID, generator, eps=1 - 1e-7, logits_shift=False
    )
    positions = loss_mask & attention_mask.bool()
    expected = F.cross_entropy(model.table.expand(2, -1, -1)[positions], input_ids[positions])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_loss_with_empty_loss_mask_is_zero():
    model = PositionTableModel(length=5, vocab=VOCAB)
    input_ids = torch.randint(0, MASK_ID, (2, 5), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss = masked_diffusion_loss(model, input_ids, attention_mask, loss_mask, MASK_ID, torch.Generator())
    assert loss.item() == 0.0


def test_inverse_t_weighting_makes_the_loss_unbiased_for_mean_cross_entropy():
    # Logits that ignore the input make each position's CE fixed; a position is masked
    # with probability t and weighted 1/t, so the expected loss is the mean CE exactly
    # (an unweighted loss would average about half of it).
    model = PositionTableModel(length=16, vocab=VOCAB)
    input_ids = torch.randint(0, MASK_ID, (2000, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loss = masked_diffusion_loss(model, input_ids, attention_mask, loss_mask, MASK_ID, generator, logits_shift=False)
        mean_cross_entropy = F.cross_entropy(model.table.expand(2000, -1, -1).reshape(-1, VOCAB), input_ids.flatten())
    assert abs(loss.item() / mean_cross_entropy.item() - 1) < 0.1


# --------------------------------------------------------------------------- CoDA's own forward (published harness)

def test_published_forward_lets_a_left_padded_row_attend_to_its_pads():
    from qrobust.tasks.models.diffusion import pads_visible_logits_at

    model = tiny_qwen3()
    input_ids, attention_mask = padded_batch()
    positions = torch.arange(3, 8).expand(2, -1)
    published = pads_visible_logits_at(model, input_ids, positions)
    other_pads = input_ids.clone()
    other_pads[1, :3] = (other_pads[1, :3] + 1) % MASK_ID
    assert not torch.allclose(published[1], pads_visible_logits_at(model, other_pads, positions)[1])
    # the row-independent forward sees none of that
    independent = diffusion_logits_at(model, input_ids, attention_mask, positions)
    assert torch.allclose(independent[1], diffusion_logits_at(model, other_pads, attention_mask, positions)[1])


def test_published_forward_of_a_row_without_pads_is_the_row_independent_one():
    from qrobust.tasks.models.diffusion import pads_visible_logits_at

    model = tiny_qwen3()
    input_ids, _ = padded_batch()
    positions = torch.arange(8).expand(2, -1)
    assert torch.allclose(pads_visible_logits_at(model, input_ids, positions),
                          diffusion_logits_at(model, input_ids, torch.ones_like(input_ids), positions), atol=1e-6)
