import math

import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st

from qrobust.tasks.decoding.diffusion import (
    DiffusionSamplerSettings,
    block_commit_counts,
    denoising_schedule,
    diffusion_generate,
    dream_commit_counts,
    masked_counts_before_each_step,
    score_positions,
    token_probabilities,
    top_k_filter,
    top_p_filter,
    truncate_at_stop,
)

VOCAB = 8
MASK_ID = 7
PAD_ID = 0


def fixed_answer_logits(answer_logits: torch.Tensor):
    """A logits function whose answer-region logits are the fixed table [N, V], whatever
    the input, so confidences are known in advance."""

    def logits_fn(ids, attention_mask):
        batch, length = ids.shape
        answer_length, vocab = answer_logits.shape
        logits = torch.zeros(batch, length, vocab)
        logits[:, length - answer_length:] = answer_logits
        return logits

    return logits_fn


def context_logits(vocab: int, seed: int):
    """A logits function that depends on the whole input, like a model: each position's
    logits are a fixed function of its token and of the sum of embeddings of real tokens."""
    generator = torch.Generator().manual_seed(seed)
    token_table = torch.randn(vocab, vocab, generator=generator)
    context_table = torch.randn(vocab, vocab, generator=generator)
    position_table = torch.randn(64, vocab, generator=generator)

    def logits_fn(ids, attention_mask):
        context = (context_table[ids] * attention_mask[..., None]).sum(dim=1, keepdim=True)
        return token_table[ids] + 0.3 * context + position_table[: ids.shape[1]]

    return logits_fn


def recording(logits_fn):
    """Wrap a logits function to keep a copy of every input it is called with."""
    seen = []

    def wrapped(ids, attention_mask):
        seen.append(ids.clone())
        return logits_fn(ids, attention_mask)

    return wrapped, seen


def observed_commit_steps(seen, answer, answer_length):
    """For each forward pass, the answer positions that were first seen unmasked after it.

    Returns (commit_forward [B, N]: index of the forward pass after which each position was
    committed, per_forward_counts [forwards, B]). Asserts a committed token never changes."""
    states = [ids[:, -answer_length:] for ids in seen] + [answer]
    commit_forward = torch.full(answer.shape, -1)
    for index in range(1, len(states)):
        before, after = states[index - 1], states[index]
        was_committed = before != MASK_ID
        assert torch.equal(after[was_committed], before[was_committed]), "a committed token changed"
        newly = (before == MASK_ID) & (after != MASK_ID)
        commit_forward[newly] = index - 1
    counts = torch.stack([(commit_forward == f).sum(dim=1) for f in range(len(seen))])
    return commit_forward, counts


def generate(logits_fn, settings, prompt_ids=None, prompt_mask=None, seed=0, return_stats=False):
    if prompt_ids is None:
        prompt_ids = torch.tensor([[1, 2, 3]])
        prompt_mask = torch.ones_like(prompt_ids)
    return diffusion_generate(
        logits_fn, prompt_ids, prompt_mask, settings, MASK_ID, torch.Generator().manual_seed(seed), return_stats
    )


def logits_from_probs(rows):
    """Logit table [N, VOCAB] whose softmax over the non-mask tokens is each given row."""
    table = torch.full((len(rows), VOCAB), -1e9)
    for index, probs in enumerate(rows):
        table[index, : len(probs)] = torch.tensor(probs).log()
    return table


# Four positions whose orders differ under each confidence measure (hand-computed):
#   A [.55 .45]        top1 .55  margin .10  entropy .688
#   B [.6 .1 .1 .1 .1] top1 .60  margin .50  entropy 1.228
#   C [.5 .125 x4]     top1 .50  margin .375 entropy 1.386
#   D [.45 .45 .1]     top1 .45  margin 0    entropy .949
CRAFTED = logits_from_probs([
    [0.55, 0.45], [0.6, 0.1, 0.1, 0.1, 0.1], [0.5, 0.125, 0.125, 0.125, 0.125], [0.45, 0.45, 0.1],
])
A, B, C, D = range(4)
COMMIT_ORDER = {
    "maskgit_plus": [B, A, C, D],
    "topk_margin": [B, C, A, D],
    "entropy": [A, D, B, C],
}


def rank_of_each_position(order):
    ranks = [0] * len(order)
    for rank, position in enumerate(order):
        ranks[position] = rank
    return ranks


# --- schedule -----------------------------------------------------------------------

def test_dream_schedule_with_as_many_steps_as_tokens_commits_nothing_first():
    # ts = 1, .75025, .5005, .25075, .001; masked * (1 - s/t) = 4*.24975=.999 -> 0,
    # 4*.3329=1.33 -> 1, 3*.499=1.50 -> 1, last step: the remaining 2
    assert dream_commit_counts(4, 4, 1e-3) == [0, 1, 1, 2]


def test_dream_schedule_with_fewer_steps_than_tokens():
    # 8*.24975=2.0- -> 1, 7*.3329=2.33 -> 2, 5*.499=2.50 -> 2, remaining 3
    assert dream_commit_counts(8, 4, 1e-3) == [1, 2, 2, 3]
    # ts = 1, .667, .334, .001: 10*.333=3.33 -> 3, 7*.4993=3.50 -> 3, remaining 4
    assert dream_commit_counts(10, 3, 1e-3) == [3, 3, 4]


def test_block_schedule_spreads_the_remainder_over_the_first_steps():
    assert block_commit_counts(8, 3) == [3, 3, 2]
    assert block_commit_counts(4, 4) == [1, 1, 1, 1]
    assert block_commit_counts(2, 4) == [1, 1, 0, 0]


@pytest.mark.parametrize(
    ("max_new_tokens", "steps", "expected_counts"),
    [(4, 4, [1, 1, 2]), (8, 4, [1, 2, 2, 3]), (10, 3, [3, 3, 4])],
)
def test_tokens_committed_per_forward_match_the_dream_schedule(max_new_tokens, steps, expected_counts):
    settings = DiffusionSamplerSettings(max_new_tokens, steps, alg="entropy")
    logits_fn, seen = recording(context_logits(VOCAB, seed=1))
    answer = generate(logits_fn, settings)
    _, counts = observed_commit_steps(seen, answer, max_new_tokens)
    assert counts[:, 0].tolist() == expected_counts


def test_a_step_that_commits_nothing_runs_no_forward_pass():
    settings = DiffusionSamplerSettings(4, 4, alg="maskgit_plus")
    logits_fn, seen = recording(context_logits(VOCAB, seed=1))
    _, stats = generate(logits_fn, settings, return_stats=True)
    assert len(seen) == stats.forward_passes == 3
    assert stats.commits_per_step()[:, 0].tolist() == [0, 1, 1, 2]


def test_block_mode_commits_per_the_block_schedule_and_only_inside_the_current_block():
    # 3 blocks of 4, 6 steps: 2 steps per block, 2 tokens each
    settings = DiffusionSamplerSettings(12, 6, alg="maskgit_plus", block_length=4, logits_shift=False)
    logits_fn, seen = recording(context_logits(VOCAB, seed=2))
    answer = generate(logits_fn, settings)
    commit_forward, counts = observed_commit_steps(seen, answer, 12)
    assert counts[:, 0].tolist() == [2, 2, 2, 2, 2, 2]
    block_of_position = torch.arange(12) // 4
    assert torch.equal(commit_forward[0] // 2, block_of_position)


def test_block_mode_with_uneven_counts():
    # 2 blocks of 3, 4 steps: 2 steps per block committing 2 then 1
    settings = DiffusionSamplerSettings(6, 4, alg="entropy", block_length=3)
    logits_fn, seen = recording(context_logits(VOCAB, seed=3))
    answer = generate(logits_fn, settings)
    _, counts = observed_commit_steps(seen, answer, 6)
    assert counts[:, 0].tolist() == [2, 1, 2, 1]


def test_stats_commit_steps_agree_with_what_the_model_saw():
    settings = DiffusionSamplerSettings(8, 4, alg="entropy")
    logits_fn, seen = recording(context_logits(VOCAB, seed=4))
    answer, stats = generate(logits_fn, settings, return_stats=True)
    commit_forward, _ = observed_commit_steps(seen, answer, 8)
    assert torch.equal(stats.commit_step, commit_forward)  # no step was skipped here


# --- commit order --------------------------------------------------------------------

@pytest.mark.parametrize("alg", sorted(COMMIT_ORDER))
def test_positions_are_committed_in_confidence_order(alg):
    # one block of 4 over 4 steps commits exactly one position per step
    settings = DiffusionSamplerSettings(4, 4, alg=alg, block_length=4)
    logits_fn, seen = recording(fixed_answer_logits(CRAFTED))
    answer = generate(logits_fn, settings)
    commit_forward, _ = observed_commit_steps(seen, answer, 4)
    assert commit_forward[0].tolist() == rank_of_each_position(COMMIT_ORDER[alg])
    assert answer[0].tolist() == [0, 0, 0, 0]  # greedy: the top token of each position


def test_dream_schedule_commits_the_most_confident_positions_first():
    # counts [0, 1, 1, 2]; maskgit order B, A, then C and D together (forward passes 0, 1, 2)
    settings = DiffusionSamplerSettings(4, 4, alg="maskgit_plus")
    logits_fn, seen = recording(fixed_answer_logits(CRAFTED))
    answer = generate(logits_fn, settings)
    commit_forward, _ = observed_commit_steps(seen, answer, 4)
    assert commit_forward[0].tolist() == [1, 0, 2, 2]


def test_tiny_alg_temp_keeps_the_confidence_order():
    settings = DiffusionSamplerSettings(4, 4, alg="topk_margin", block_length=4, alg_temp=1e-6)
    for seed in range(3):
        logits_fn, seen = recording(fixed_answer_logits(CRAFTED))
        answer = generate(logits_fn, settings, seed=seed)
        commit_forward, _ = observed_commit_steps(seen, answer, 4)
        assert commit_forward[0].tolist() == rank_of_each_position(COMMIT_ORDER["topk_margin"])


def commit_orders_over_seeds(settings, seeds):
    orders = set()
    for seed in seeds:
        logits_fn, seen = recording(fixed_answer_logits(CRAFTED))
        answer = generate(logits_fn, settings, seed=seed)
        orders.add(tuple(observed_commit_steps(seen, answer, 4)[0][0].tolist()))
    return orders


def test_large_alg_temp_samples_positions_so_the_order_varies_with_the_seed():
    settings = DiffusionSamplerSettings(4, 4, alg="maskgit_plus", block_length=4, alg_temp=100.0)
    assert len(commit_orders_over_seeds(settings, range(8))) > 1


@pytest.mark.parametrize(
    "settings",
    [
        DiffusionSamplerSettings(4, 4, alg="origin"),
        DiffusionSamplerSettings(4, 4, alg="origin", block_length=4),
        DiffusionSamplerSettings(4, 4, alg="entropy", block_length=4, remasking="random"),
    ],
    ids=["origin", "origin-blocks", "random-remasking"],
)
def test_random_commit_orders_vary_with_the_seed(settings):
    assert len(commit_orders_over_seeds(settings, range(8))) > 1


def test_random_remasking_keeps_the_scheduled_counts():
    settings = DiffusionSamplerSettings(8, 4, alg="entropy", remasking="random")
    logits_fn, seen = recording(context_logits(VOCAB, seed=1))
    answer = generate(logits_fn, settings, seed=3)
    assert observed_commit_steps(seen, answer, 8)[1][:, 0].tolist() == [1, 2, 2, 3]


# --- invariants -----------------------------------------------------------------------

@st.composite
def sampler_cases(draw):
    max_new_tokens = draw(st.integers(1, 12))
    steps = draw(st.integers(1, 14))
    block_length = None
    if draw(st.booleans()):
        block_length = draw(st.sampled_from([b for b in range(1, max_new_tokens + 1) if max_new_tokens % b == 0]))
        num_blocks = max_new_tokens // block_length
        steps = num_blocks * draw(st.integers(1, 4))
    settings = DiffusionSamplerSettings(
        max_new_tokens, steps,
        alg=draw(st.sampled_from(["origin", "maskgit_plus", "topk_margin", "entropy"])),
        temperature=draw(st.sampled_from([None, 0.7])),
        top_p=draw(st.sampled_from([None, 0.9])),
        top_k=draw(st.sampled_from([None, 3])),
        alg_temp=draw(st.sampled_from([None, 0.5])),
        block_length=block_length,
        remasking=draw(st.sampled_from(["low_confidence", "random"])),
    )
    batch = draw(st.integers(1, 3))
    prompt_length = draw(st.integers(1, 5))
    pads = [draw(st.integers(0, prompt_length - 1)) for _ in range(batch)]
    return settings, batch, prompt_length, pads, draw(st.integers(0, 2**16))


@hypothesis_settings(max_examples=60, deadline=None)
@given(sampler_cases())
def test_every_answer_position_is_committed_exactly_once_and_no_mask_remains(case):
    settings, batch, prompt_length, pads, seed = case
    prompt_ids = torch.randint(1, MASK_ID, (batch, prompt_length), generator=torch.Generator().manual_seed(seed))
    prompt_mask = torch.ones_like(prompt_ids)
    for row, pad in enumerate(pads):
        prompt_ids[row, :pad] = PAD_ID
        prompt_mask[row, :pad] = 0
    logits_fn, seen = recording(context_logits(VOCAB, seed))
    answer = generate(logits_fn, settings, prompt_ids, prompt_mask, seed=seed)
    assert answer.shape == (batch, settings.max_new_tokens)
    assert not (answer == MASK_ID).any()
    commit_forward, counts = observed_commit_steps(seen, answer, settings.max_new_tokens)
    assert (commit_forward >= 0).all()  # each position went from mask to a token exactly once
    assert all(torch.equal(ids[:, :prompt_length], prompt_ids) for ids in seen)
    if settings.alg == "origin" and settings.block_length is None:
        return  # Dream's origin rule commits a random number per step
    scheduled = [step for step in denoising_schedule(settings) if step.commit_count > 0]
    assert len(seen) == len(scheduled)
    for forward, step in enumerate(scheduled):
        assert (counts[forward] == step.commit_count).all()
        committed_here = commit_forward == forward
        positions = torch.arange(settings.max_new_tokens).expand(batch, -1)
        assert ((positions[committed_here] >= step.start) & (positions[committed_here] < step.end)).all()


def test_mask_token_is_never_committed_even_when_the_model_prefers_it():
    table = torch.zeros(5, VOCAB)
    table[:, MASK_ID] = 50.0
    table[:, 3] = 1.0
    for temperature in (None, 1.0):
        settings = DiffusionSamplerSettings(5, 3, alg="maskgit_plus", temperature=temperature)
        answer = generate(fixed_answer_logits(table), settings)
        assert not (answer == MASK_ID).any()
    assert generate(fixed_answer_logits(table), DiffusionSamplerSettings(5, 3)).tolist() == [[3] * 5]


def test_greedy_generation_is_repeatable_and_ignores_the_generator():
    settings = DiffusionSamplerSettings(10, 5, alg="entropy", top_p=0.9, top_k=4)
    outputs = [generate(context_logits(VOCAB, seed=7), settings, seed=seed) for seed in (0, 0, 123)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_sampled_generation_depends_on_the_generator_seed():
    settings = DiffusionSamplerSettings(10, 5, alg="entropy", temperature=1.0)
    outputs = {tuple(generate(context_logits(VOCAB, seed=7), settings, seed=seed)[0].tolist()) for seed in range(4)}
    assert len(outputs) > 1


def test_sampled_tokens_follow_the_model_distribution():
    # one position, p = [.7, .3]; 4000 independent rows
    table = logits_from_probs([[0.7, 0.3]])
    settings = DiffusionSamplerSettings(1, 1, alg="maskgit_plus", temperature=1.0)
    prompt_ids = torch.ones((4000, 1), dtype=torch.long)
    answer = generate(fixed_answer_logits(table), settings, prompt_ids, torch.ones_like(prompt_ids))
    assert abs((answer == 0).float().mean().item() - 0.7) < 0.03


# --- filters ----------------------------------------------------------------------------

def kept_tokens(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.45, {2}), (0.79, {2, 0}), (0.81, {2, 0, 3}), (0.96, {0, 1, 2, 3})],
)
@pytest.mark.parametrize("candidates", [1, 2, 3, 256])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected, candidates):
    # token 2: .5, token 0: .3, token 3: .15, token 1: .05; `candidates` below the nucleus
    # size takes the full-sort route, at or above it the top-candidates route
    logits = torch.tensor([0.3, 0.05, 0.5, 0.15]).log()
    assert kept_tokens(top_p_filter(logits, top_p, candidates)) == expected


def test_top_p_routes_agree_on_random_rows():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    top_64_mass = logits.softmax(dim=-1).topk(64, dim=-1).values.sum(dim=-1)
    for top_p in (0.3, 0.7, 0.9):
        assert (top_64_mass >= top_p).all()  # so the top-candidates route is the one taken
        full_sort = top_p_filter(logits, top_p, candidates=300)
        top_candidates = top_p_filter(logits, top_p, candidates=64)
        assert torch.equal(torch.isfinite(full_sort), torch.isfinite(top_candidates))


def test_top_p_filters_each_row_on_its_own():
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]).log()
    filtered = top_p_filter(logits, 0.65)
    assert torch.isfinite(filtered).tolist() == [[True, True, False], [False, False, True]]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum().item() == 2
    assert kept_tokens(top_k_filter(torch.tensor([0.1, 5.0, 2.0, 3.0]), 2)) == {1, 3}
    assert kept_tokens(top_k_filter(torch.tensor([0.1, 5.0]), 10)) == {0, 1}


def test_filtered_probabilities_are_renormalised_over_the_kept_tokens():
    probs = token_probabilities(torch.tensor([0.5, 0.3, 0.2]).log(), temperature=None, top_p=0.7, top_k=None)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0]))
    sharpened = token_probabilities(torch.tensor([0.0, math.log(2.0)]), temperature=0.5, top_p=None, top_k=None)
    torch.testing.assert_close(sharpened, torch.tensor([0.2, 0.8]))


# --- a real model ---------------------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_prompt_generates_the_same_alone_and_beside_a_longer_prompt(padding_side):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qrobust.tasks.models.diffusion import diffusion_logits

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    model = Qwen3ForCausalLM(config).eval()
    mask_id = 95
    short = torch.tensor([[5, 6, 7]])
    long = torch.tensor([[11, 12, 13, 14, 15, 16, 17]])
    pads = torch.zeros(1, 4, dtype=torch.long)
    padded_short = torch.cat([pads, short] if padding_side == "left" else [short, pads], dim=1)
    batch_ids = torch.cat([padded_short, long])
    batch_mask = (torch.arange(7) >= 4 if padding_side == "left" else torch.arange(7) < 3).long().expand(2, -1).clone()
    batch_mask[1] = 1
    for settings in (
        DiffusionSamplerSettings(8, 8, alg="entropy"),
        DiffusionSamplerSettings(8, 4, alg="maskgit_plus", block_length=4, logits_shift=False),
    ):
        def logits_fn(ids, attention_mask):
            return diffusion_logits(model, ids, attention_mask, settings.logits_shift)

        with torch.no_grad():
            alone = diffusion_generate(logits_fn, short, torch.ones_like(short), settings, mask_id, torch.Generator())
            batched = diffusion_generate(logits_fn, batch_ids, batch_mask, settings, mask_id, torch.Generator())
            long_alone = diffusion_generate(logits_fn, long, torch.ones_like(long), settings, mask_id, torch.Generator())
        assert torch.equal(batched[0], alone[0])
        assert torch.equal(batched[1], long_alone[0])


def at_positions(logits_fn):
    """The positions form of a full-logits function, recording (ids, positions) of each call."""
    asked = []

    def logits_at(ids, attention_mask, positions):
        asked.append((ids.clone(), positions.clone()))
        full = logits_fn(ids, attention_mask)
        return full[torch.arange(ids.shape[0])[:, None], positions]

    return logits_at, asked


@pytest.mark.parametrize("settings", [
    DiffusionSamplerSettings(10, 5, alg="entropy"),
    DiffusionSamplerSettings(10, 5, alg="topk_margin", temperature=0.7, top_p=0.9),
    DiffusionSamplerSettings(10, 4, alg="maskgit_plus", temperature=1.0, block_length=5, alg_temp=0.5),
    DiffusionSamplerSettings(10, 5, alg="origin", temperature=1.0),
])
def test_logits_at_positions_give_the_answers_of_full_logits_and_score_only_masked_positions(settings):
    prompt_ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    logits_fn = context_logits(VOCAB, seed=3)
    full = diffusion_generate(logits_fn, prompt_ids, prompt_mask, settings, MASK_ID, torch.Generator().manual_seed(5))
    logits_at, asked = at_positions(logits_fn)
    selected = diffusion_generate(logits_at, prompt_ids, prompt_mask, settings, MASK_ID,
                                  torch.Generator().manual_seed(5), logits_at_positions=True)
    assert torch.equal(selected, full)
    for ids, positions in asked:
        if settings.alg != "origin":  # under origin every window position is scored
            assert (ids.gather(1, positions) == MASK_ID).all()
            assert ((ids == MASK_ID).sum(dim=1) >= positions.shape[1]).all()


def test_masked_counts_fall_by_each_steps_commits_and_restart_per_block():
    dream = denoising_schedule(DiffusionSamplerSettings(10, 4))
    counts = masked_counts_before_each_step(dream)
    assert counts[0] == 10
    assert [counts[i] - counts[i + 1] for i in range(3)] == [step.commit_count for step in dream[:3]]
    blocks = masked_counts_before_each_step(denoising_schedule(DiffusionSamplerSettings(8, 4, block_length=4)))
    assert blocks == [4, 2, 4, 2]
    assert set(masked_counts_before_each_step(denoising_schedule(DiffusionSamplerSettings(8, 4, alg="origin")))) == {None}


def reference_scores(logits, settings, statistic):
    """Probabilities and confidence from the full-vocabulary filtered distribution."""
    logits = logits.clone()
    logits[..., MASK_ID] = float("-inf")
    probs = token_probabilities(logits, settings.temperature, settings.top_p, settings.top_k)
    if statistic == "entropy":
        return probs, -torch.special.entr(probs).sum(dim=-1)
    top_two = probs.topk(2, dim=-1).values
    return probs, top_two[..., 0] - top_two[..., 1]


@pytest.mark.parametrize("statistic", ["entropy", "topk_margin"])
def test_nucleus_candidate_scores_equal_the_full_distributions(statistic):
    logits = torch.randn(3, 4, 1000, generator=torch.Generator().manual_seed(0)) * 4
    settings = DiffusionSamplerSettings(4, 4, temperature=0.5, top_p=0.9)
    probs, expected = reference_scores(logits, settings, statistic)
    assert (probs > 0).sum(dim=-1).max() < 256  # every nucleus fits the candidates: their route is taken
    tokens, confidence = score_positions(logits, settings, MASK_ID, torch.Generator().manual_seed(1), statistic)
    torch.testing.assert_close(confidence, expected, atol=1e-5, rtol=1e-5)
    assert (probs.gather(-1, tokens[..., None]) > 0).all()


def test_nucleus_candidate_draws_follow_the_filtered_distribution():
    logits = torch.full((1, 1, 600), -20.0)
    logits[0, 0, :3] = torch.tensor([0.6, 0.3, 0.1]).log()
    settings = DiffusionSamplerSettings(1, 1, temperature=1.0, top_p=0.85)
    rows = logits.expand(4000, 1, 600)
    tokens, _ = score_positions(rows, settings, MASK_ID, torch.Generator().manual_seed(2), None)
    assert set(tokens.unique().tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 2 / 3) < 0.03


@pytest.mark.parametrize("settings", [
    DiffusionSamplerSettings(4, 4, alg="entropy", top_p=0.9),
    DiffusionSamplerSettings(4, 4, alg="topk_margin", top_k=5),
])
def test_scoring_in_chunks_of_rows_changes_no_greedy_result(settings, monkeypatch):
    import qrobust.tasks.decoding.diffusion as sampler

    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    whole = score_positions(logits, settings, MASK_ID, torch.Generator().manual_seed(1), settings.alg)
    monkeypatch.setattr(sampler, "SCORING_CHUNK_ELEMENTS", 2 * 40)
    chunked = score_positions(logits, settings, MASK_ID, torch.Generator().manual_seed(1), settings.alg)
    assert torch.equal(chunked[0], whole[0])
    assert torch.equal(chunked[1], whole[1])


# --- settings and answers -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"alg": "greedy"}, "alg must be one of .*got 'greedy'"),
        ({"remasking": "low"}, "remasking must be one of .*got 'low'"),
        ({"temperature": -1.0}, "temperature must be None or >= 0, got -1.0"),
        ({"top_p": 0.0}, r"top_p must be None or in \(0, 1\], got 0.0"),
        ({"top_k": 0}, "top_k must be None or an int >= 1, got 0"),
        ({"eps": 1.0}, r"eps must be in \(0, 1\), got 1.0"),
        ({"block_length": 3}, "max_new_tokens 8 must be a multiple of block_length 3"),
        ({"block_length": 2, "steps": 6}, "steps 6 must be a multiple of the number of blocks 4"),
    ],
)
def test_invalid_settings_are_refused_naming_the_bad_value(overrides, message):
    arguments = {"max_new_tokens": 8, "steps": 8, **overrides}
    with pytest.raises(ValueError, match=message):
        DiffusionSamplerSettings(**arguments)


def test_prompt_and_mask_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        generate(context_logits(VOCAB, 0), DiffusionSamplerSettings(2, 2), torch.ones(1, 3, dtype=torch.long),
                 torch.ones(1, 2, dtype=torch.long))


def test_answer_ends_at_the_first_stop_token():
    assert truncate_at_stop([5, 6, 2, 7, 2], stop_token_ids=[2, 3]) == [5, 6]
    assert truncate_at_stop(torch.tensor([5, 3, 6]), stop_token_ids=[2, 3]) == [5]
    assert truncate_at_stop([5, 6], stop_token_ids=[2]) == [5, 6]


def test_a_mask_token_left_in_the_answer_ends_it():
    assert truncate_at_stop([5, MASK_ID, 6, 2], stop_token_ids=[2], mask_token_id=MASK_ID) == [5]


# --- the published harness (coda_published_generate) --------------------------------

from qrobust.tasks.decoding.diffusion import (  # noqa: E402
    PUBLISHED_ENTROPY_EPSILON,
    coda_published_generate,
    published_answer_text,
    published_scores,
)


def published(logits_for_row, settings, prompt_ids, seed=0):
    """Run the published sampler on logits [V] chosen per (row, column) by `logits_for_row`,
    recording the ids each step saw."""
    seen = []

    def logits_at(ids, positions):
        seen.append(ids.clone())
        rows = [[logits_for_row(b, int(p)) for p in positions[b]] for b in range(ids.shape[0])]
        return torch.stack([torch.stack(row) for row in rows])

    answer = coda_published_generate(logits_at, prompt_ids, settings, MASK_ID, torch.Generator().manual_seed(seed))
    return answer, seen


def preferring(token, strength=5.0):
    row = torch.zeros(VOCAB)
    row[token] = strength
    return row


def test_published_sampler_commits_the_batch_mean_count_of_each_step():
    settings = DiffusionSamplerSettings(6, 3, alg="entropy")
    _, seen = published(lambda b, p: preferring(3 + p % 3), settings, torch.tensor([[1, 2], [1, 2]]))
    still_masked = [int((ids[0] == MASK_ID).sum()) for ids in seen]
    timesteps = torch.linspace(1, settings.eps, settings.steps + 1)
    expected, masked = [], 6
    for step in range(settings.steps):
        expected.append(masked)
        s, t = timesteps[step + 1], timesteps[step]
        masked -= int(torch.tensor(float(masked)) * (1 - s / t)) if step < settings.steps - 1 else masked
    assert still_masked == expected


def test_published_sampler_may_draw_the_mask_token_and_scores_that_position_again():
    # column 3 (the second answer position) prefers the mask token until it was scored once
    scored = {}

    def logits(b, p):
        scored[p] = scored.get(p, 0) + 1
        return preferring(MASK_ID, 50.0) if p == 3 and scored[p] == 1 else preferring(4)

    settings = DiffusionSamplerSettings(3, 3, alg="maskgit_plus")
    answer, seen = published(logits, settings, torch.tensor([[1, 2]]))
    assert scored[3] >= 2 and (answer != MASK_ID).all()
    # the row-independent sampler never draws it
    assert not (generate(fixed_answer_logits(torch.stack([preferring(MASK_ID, 50.0)] * 3)),
                         DiffusionSamplerSettings(3, 3, alg="maskgit_plus")) == MASK_ID).any()


def test_a_row_with_fewer_masks_than_the_batch_count_has_committed_positions_masked_again():
    # row 0 keeps drawing the mask token, row 1 commits real tokens: at the last step the
    # batch-mean count (int(4.5)) exceeds row 1's 3 masked positions and top-k reaches one of its
    # committed ones (no prompt, so that it can only be an answer position)
    settings = DiffusionSamplerSettings(6, 3, alg="maskgit_plus")
    answer, _ = published(lambda b, p: preferring(MASK_ID, 50.0) if b == 0 else preferring(4),
                          settings, torch.empty((2, 0), dtype=torch.long))
    assert (answer[0] == MASK_ID).all()
    assert (answer[1] == MASK_ID).any() and (answer[1] == 4).any()


def test_published_scores_are_computed_in_the_logits_dtype_with_the_harness_entropy():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    confidence, tokens = published_scores(logits, DiffusionSamplerSettings(4, 4, alg="entropy"), torch.Generator())
    probs = torch.softmax(logits, dim=-1)
    assert confidence.dtype == torch.bfloat16
    assert torch.equal(confidence, (probs * torch.log(probs + PUBLISHED_ENTROPY_EPSILON)).sum(dim=-1))
    assert torch.equal(tokens, probs.argmax(dim=-1))


def test_published_top_p_keeps_each_token_whose_preceding_mass_is_within_top_p():
    logits = logits_from_probs([[0.5, 0.3, 0.15, 0.05]])
    settings = DiffusionSamplerSettings(4, 4, alg="maskgit_plus", temperature=1.0, top_p=0.85)
    drawn = {int(published_scores(logits, settings, torch.Generator().manual_seed(seed))[1]) for seed in range(200)}
    assert drawn == {0, 1, 2}


def test_a_published_answer_keeps_special_tokens_and_ends_at_the_eos_text_only():
    from qrobust.tasks.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(1024)
    ids = tokenizer("return x", add_special_tokens=False)["input_ids"]
    answer = torch.tensor(ids + [tokenizer.pad_token_id, tokenizer.mask_token_id] + ids
                          + [tokenizer.eos_token_id] + ids)
    text, count = published_answer_text(tokenizer, answer)
    assert text == "return x" + tokenizer.pad_token + tokenizer.mask_token + "return x"
    assert count == 2 * len(ids) + 2


def test_a_tiny_diffusion_model_answers_under_the_published_harness(tiny_models, shared_workspace):
    from qrobust.tasks.config import GenerationSpec
    from qrobust.tasks.decoding.diffusion import answers
    from qrobust.tasks.models.loading import load_model, load_tokenizer

    checkpoint = tiny_models["tiny-diffusion"]
    model = load_model(checkpoint, shared_workspace, "cpu")
    tokenizer = load_tokenizer(checkpoint, shared_workspace)
    generation = GenerationSpec(max_new_tokens=8, steps=8, harness="coda-published", batch_size=32, shard_size=32)
    prompts = ["def add(a, b):\n", "def a_much_longer_function_name(first, second, third):\n"]
    texts, counts = answers(model, tokenizer, prompts, generation, checkpoint, seed=0)
    again, _ = answers(model, tokenizer, prompts, generation, checkpoint, seed=0)
    assert texts == again and len(texts) == 2
    assert all(tokenizer.eos_token not in text for text in texts) and all(0 <= c <= 8 for c in counts)


def test_published_origin_commits_each_masked_position_with_probability_one_minus_s_over_t():
    settings = DiffusionSamplerSettings(400, 2, alg="origin")
    _, seen = published(lambda b, p: preferring(4), settings, torch.tensor([[1, 2]]))
    committed_first = int((seen[1][0, 2:] != MASK_ID).sum())
    s_over_t = torch.linspace(1, settings.eps, 3)[1].item()
    assert abs(committed_first / 400 - (1 - s_over_t)) < 0.08
    answer, _ = published(lambda b, p: preferring(4), settings, torch.tensor([[1, 2]]))
    assert (answer == 4).all()  # the last step commits every position left


# --- LLaDA's eos settings ----------------------------------------------------------------

def test_a_suppressed_token_is_never_drawn_even_where_the_model_prefers_it():
    settings = DiffusionSamplerSettings(4, 4, alg="maskgit_plus", block_length=4, suppressed_token_ids=(0,))
    answer = generate(fixed_answer_logits(CRAFTED), settings)
    assert answer[0].tolist() == [1, 1, 1, 1]  # every position's second choice; 0 leads in all four


# top tokens: P0 token 1 (.50, with .45 on token 0), P1 token 0 (.95), P2 token 2 (.80), P3 token 3 (.70)
EXCLUDED_ZERO = logits_from_probs([[0.45, 0.5, 0.05], [0.95, 0.05], [0.0, 0.1, 0.8, 0.1], [0.0, 0.1, 0.2, 0.7]])


def test_a_token_left_out_of_the_confidence_is_still_drawn_but_committed_last():
    plain = DiffusionSamplerSettings(4, 4, alg="maskgit_plus", block_length=4)
    excluded = DiffusionSamplerSettings(4, 4, alg="maskgit_plus", block_length=4, confidence_excluded_token_ids=(0,))
    orders = {}
    for name, settings in (("plain", plain), ("excluded", excluded)):
        logits_fn, seen = recording(fixed_answer_logits(EXCLUDED_ZERO))
        answer = generate(logits_fn, settings)
        assert answer[0].tolist() == [1, 0, 2, 3]
        orders[name] = observed_commit_steps(seen, answer, 4)[0][0].tolist()
    assert orders["plain"] == [3, 0, 1, 2]  # by the drawn token's probability: P1 .95, P2 .80, P3 .70, P0 .50
    # without token 0, P0's distribution renormalises to .50/.55 and leads; P1 has confidence 0
    assert orders["excluded"] == [0, 3, 1, 2]


@pytest.mark.parametrize("name", ["suppressed_token_ids", "confidence_excluded_token_ids"])
def test_token_ids_that_are_not_ids_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be a tuple of token ids >= 0, got \\(-1,\\)"):
        DiffusionSamplerSettings(4, 4, **{name: (-1,)})


def test_a_token_name_the_tokenizer_lacks_is_refused_in_one_line():
    from qrobust.tasks.decoding.diffusion import token_ids
    from qrobust.tasks.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(1024)
    assert token_ids(("<|mask|>", "<|im_end|>"), tokenizer, "suppressed_tokens") == (2, 1)
    with pytest.raises(ValueError, match="generation suppressed_tokens names '<\\|eot_id\\|>', which is not a token"):
        token_ids(("<|eot_id|>",), tokenizer, "suppressed_tokens")
