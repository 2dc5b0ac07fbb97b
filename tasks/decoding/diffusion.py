"""Masked-diffusion sampler: Dream / CoDA single-block denoising and LLaDA-style blocks.

The answer region starts as `max_new_tokens` mask tokens appended to the (left-padded)
prompt. Each denoising step runs the model once, draws a token for every still-masked
position, and commits some of them; a committed token never changes again. How many are
committed at each step is fixed in advance by `denoising_schedule` (it depends only on
the settings), so the loop needs no host synchronisation (top-p filtering alone takes
one per step, see `top_p_filter`); which ones are committed is decided by a confidence
measure (`alg`).

`logits_fn(input_ids, attention_mask) -> logits [B, L, V]` must already return logits
aligned so that position i scores token i (see `qrobust.tasks.models.diffusion.diffusion_logits`).
With `logits_at_positions=True` it is called as `logits_fn(input_ids, attention_mask,
positions)` and returns those logits only at `positions` [B, K], as [B, K, V] (see
`qrobust.tasks.models.diffusion.diffusion_logits_at`): a step scores only the answer positions
still masked, so the rest of the sequence never needs its logits.

Scoring works on rows of at most `SCORING_CHUNK_ELEMENTS` logits at a time, so that the
float32 copies it needs stay small beside the model. When sampling with top-p and each
row's nucleus lies among its `NUCLEUS_CANDIDATES` most probable tokens (the usual case),
the draw and the confidence are computed on those candidates alone.

`coda_published_generate` is the other harness (`generation.harness = "coda-published"`): CoDA's
sampler as its published evaluation runs it, for reproducing the published numbers. Where the
two differ, the default keeps each row independent of its batch and of floating-point ties:

- pads of a left-padded batch: invisible, positions counted from each row's first token (default);
  attended to, positions counted from the first pad, since CoDA's forward ignores the pad mask
  (published).
- scoring arithmetic: float32 (default); the model's dtype, bf16, with top-p sorted over the whole
  vocabulary and a token kept while the mass before it is <= top_p (published).
- the mask token: never drawn (default); drawable, and a position that draws it stays masked and
  is scored again (published).
- tokens committed per step: fixed in advance per row (default); int(batch-mean masked count x
  (1 - s/t)) from the current state, by top-k over each whole row (published).
- the answer: the tokens before eos, pad or mask, special tokens dropped (default); the decoded
  text with its special tokens, cut at the eos text only (published).

Random draws come from the caller's generator in both, so sampled answers are the same
distribution as CoDA's, not the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
NUCLEUS_CANDIDATES = 256
# 2**28 float32 values: 1 GiB per full-vocabulary copy, i.e. 1766 positions at 151936 tokens
SCORING_CHUNK_ELEMENTS = 1 << 28
REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class DiffusionSamplerSettings:
    """Every setting that decides what the sampler writes (record it with the results).

    - alg: confidence used to pick which masked positions to commit. `origin` is random:
      in single-block mode it follows Dream's rule (each masked position commits with
      probability 1 - s/t, so the count varies per row); in block mode it commits the
      scheduled number of random positions. `maskgit_plus`: probability of the drawn token;
      `topk_margin`: top-1 minus top-2 probability; `entropy`: negative entropy. All are
      measured on the distribution after temperature / top-p / top-k.
    - temperature None or 0: greedy (argmax). top_p, top_k: None disables.
    - alg_temp: None or 0 commits the top-confidence positions; > 0 samples them without
      replacement from softmax(confidence / alg_temp).
    - block_length: None = one block over the whole answer (Dream / CoDA); an int = LLaDA's
      semi-autoregressive blocks, left to right, `steps / num_blocks` steps each.
    - remasking: `low_confidence` ranks positions by `alg`; `random` ranks them at random
      (LLaDA's two options; under Dream's count rule `random` keeps the schedule's counts,
      unlike alg `origin`).
    - logits_shift: how the model's logits are aligned; the sampler itself only records it,
      the caller's logits_fn applies it.
    - suppressed_token_ids: tokens never drawn, like the mask token (LLaDA's `logits_eos_inf`
      suppresses its eos).
    - confidence_excluded_token_ids: tokens removed from the distribution that the confidence
      is measured on, which is renormalised over the rest; a position whose drawn token is
      one of them has confidence 0 under maskgit_plus and is committed last. The draw is
      unchanged. This is what LLaDA's `confidence_eos_eot_inf` does in its published
      generate.py under greedy decoding (to eos and `<|eot_id|>`).
    """

    max_new_tokens: int
    steps: int
    alg: str = "entropy"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float = 1e-3
    block_length: int | None = None
    remasking: str = "low_confidence"
    logits_shift: bool = True
    suppressed_token_ids: tuple[int, ...] = ()
    confidence_excluded_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                 f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        _require(_is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        _require(self.alg in ALGORITHMS, f"alg must be one of {ALGORITHMS}, got {self.alg!r}")
        _require(self.remasking in REMASKING, f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        _require(self.temperature is None or self.temperature >= 0,
                 f"temperature must be None or >= 0, got {self.temperature!r}")
        _require(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be None or in (0, 1], got {self.top_p!r}")
        _require(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
                 f"top_k must be None or an int >= 1, got {self.top_k!r}")
        _require(self.alg_temp is None or self.alg_temp >= 0, f"alg_temp must be None or >= 0, got {self.alg_temp!r}")
        _require(0 < self.eps < 1, f"eps must be in (0, 1), got {self.eps!r}")
        _require(isinstance(self.logits_shift, bool), f"logits_shift must be a bool, got {self.logits_shift!r}")
        for name in ("suppressed_token_ids", "confidence_excluded_token_ids"):
            ids = getattr(self, name)
            _require(isinstance(ids, tuple) and all(_is_int(i) and i >= 0 for i in ids),
                     f"{name} must be a tuple of token ids >= 0, got {ids!r}")
        if self.block_length is not None:
            _require(_is_int(self.block_length) and self.block_length >= 1,
                     f"block_length must be None or an int >= 1, got {self.block_length!r}")
            _require(self.max_new_tokens % self.block_length == 0,
                     f"max_new_tokens {self.max_new_tokens} must be a multiple of block_length {self.block_length}")
            _require(self.steps % self.num_blocks == 0,
                     f"steps {self.steps} must be a multiple of the number of blocks {self.num_blocks}")

    @property
    def num_blocks(self) -> int:
        return 1 if self.block_length is None else self.max_new_tokens // self.block_length

    @property
    def greedy(self) -> bool:
        return not self.temperature


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DenoisingStep:
    """One forward pass: answer positions [start, end) may be committed.

    `commit_count` positions per row are committed, except under Dream's `origin` rule,
    where `transfer_prob` is set and each masked position commits with that probability.
    """

    start: int
    end: int
    commit_count: int
    transfer_prob: float | None = None


@dataclass(frozen=True)
class DiffusionGenerationStats:
    """What a generation cost and did. `commit_step[b, j]` is the step that committed answer
    token j of row b; `forward_passes` can be below `steps` because a step that commits
    nothing is skipped (its forward pass would change nothing)."""

    steps: int
    forward_passes: int
    commit_step: torch.Tensor

    def commits_per_step(self) -> torch.Tensor:
        """LongTensor [steps, B]: how many tokens each step committed in each row."""
        return F.one_hot(self.commit_step, self.steps).sum(dim=1).T


def dream_commit_counts(num_tokens: int, steps: int, eps: float) -> list[int]:
    """Dream / CoDA: with t, s = ts[i], ts[i+1] of linspace(1, eps, steps + 1), step i commits
    int(masked * (1 - s/t)) positions, and the last step all that remain.

    Computed in float32 like the reference implementation, because int() of the product
    sits close to integers (with steps == num_tokens the first step commits 0).
    """
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    counts, remaining = [], num_tokens
    for i in range(steps):
        if i == steps - 1:
            count = remaining
        else:
            fraction = 1 - timesteps[i + 1] / timesteps[i]
            count = min(int(torch.tensor(remaining, dtype=torch.float32) * fraction), remaining)
        counts.append(count)
        remaining -= count
    return counts


def dream_transfer_probabilities(steps: int, eps: float) -> list[float]:
    """Dream's `origin` rule: at step i each masked position commits with prob 1 - s/t
    (1 at the last step)."""
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    probabilities = (1 - timesteps[1:] / timesteps[:-1]).tolist()
    probabilities[-1] = 1.0
    return probabilities


def block_commit_counts(num_tokens: int, steps: int) -> list[int]:
    """LLaDA: num_tokens // steps per step, the remainder spread one each over the first
    steps, so the block is complete after its last step."""
    base, remainder = divmod(num_tokens, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def denoising_schedule(settings: DiffusionSamplerSettings) -> list[DenoisingStep]:
    """The fixed plan of steps: which answer positions each step may commit, and how many."""
    if settings.block_length is None:
        n = settings.max_new_tokens
        counts = dream_commit_counts(n, settings.steps, settings.eps)
        if settings.alg == "origin":
            probabilities = dream_transfer_probabilities(settings.steps, settings.eps)
            return [DenoisingStep(0, n, count, p) for count, p in zip(counts, probabilities)]
        return [DenoisingStep(0, n, count) for count in counts]
    block = settings.block_length
    counts = block_commit_counts(block, settings.steps // settings.num_blocks)
    return [
        DenoisingStep(b * block, (b + 1) * block, count)
        for b in range(settings.num_blocks)
        for count in counts
    ]


LogitsFn = Callable[..., torch.Tensor]


def diffusion_generate(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: DiffusionSamplerSettings,
    mask_token_id: int,
    generator: torch.Generator,
    return_stats: bool = False,
    *,
    logits_at_positions: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DiffusionGenerationStats]:
    """Denoise `max_new_tokens` mask tokens appended to each prompt; returns the answer
    tokens, LongTensor [B, max_new_tokens] (and the stats if `return_stats`).

    Prompts are usually left padded; `diffusion_logits` makes pads invisible, so a row's
    answer does not depend on its padding or on the other rows when sampling is greedy.
    Both forms of `logits_fn` (see the module's doc) give the same answers, sampled ones too.

    `generator` must live on the prompt's device (random draws are as large as the logits).
    It is not used at all when sampling is greedy, `alg` is not `origin`, `alg_temp` is
    unset and remasking is `low_confidence`. The mask token itself is never drawn, so
    every answer position ends with a real token.
    """
    _require(prompt_ids.shape == prompt_mask.shape,
             f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} differ in shape")
    _require(generator.device.type == prompt_ids.device.type,
             f"generator is on {generator.device} but the prompt is on {prompt_ids.device}; use one device")
    batch, prompt_length = prompt_ids.shape
    n = settings.max_new_tokens
    ids = torch.cat([prompt_ids, prompt_ids.new_full((batch, n), mask_token_id)], dim=1)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones((batch, n))], dim=1)
    still_masked = torch.ones((batch, n), dtype=torch.bool, device=prompt_ids.device)
    commit_step = torch.full((batch, n), -1, dtype=torch.long, device=prompt_ids.device)
    schedule = denoising_schedule(settings)
    masked_counts = masked_counts_before_each_step(schedule)
    rows = torch.arange(batch, device=prompt_ids.device)[:, None]
    forward_passes = 0
    for step_index, (step, masked_count) in enumerate(zip(schedule, masked_counts)):
        if step.transfer_prob is None and step.commit_count == 0:
            continue
        window = slice(prompt_length + step.start, prompt_length + step.end)
        window_masked = still_masked[:, step.start:step.end]
        scored = _positions_to_score(window_masked, masked_count)
        sequence_positions = scored + prompt_length + step.start
        if logits_at_positions:
            logits = logits_fn(ids, attention_mask, sequence_positions)
        else:
            logits = logits_fn(ids, attention_mask)[rows, sequence_positions]
        forward_passes += 1
        commit, tokens = _denoise_positions(
            logits, window_masked.gather(1, scored), step, settings, mask_token_id, generator
        )
        window_commit = torch.zeros_like(window_masked).scatter(1, scored, commit)
        window_tokens = ids[:, window].scatter(1, scored, tokens)
        ids[:, window] = torch.where(window_commit, window_tokens, ids[:, window])
        window_masked &= ~window_commit
        commit_step[:, step.start:step.end].masked_fill_(window_commit, step_index)
    answer = ids[:, prompt_length:]
    if return_stats:
        return answer, DiffusionGenerationStats(len(schedule), forward_passes, commit_step)
    return answer


def masked_counts_before_each_step(schedule: list[DenoisingStep]) -> list[int | None]:
    """Per step, how many positions of its window every row still has masked, or None where
    that varies by row (Dream's `origin` rule commits a random number)."""
    counts, committed = [], {}
    for step in schedule:
        window = (step.start, step.end)
        if step.transfer_prob is not None:
            committed[window] = None
        done = committed.get(window, 0)
        counts.append(None if done is None else step.end - step.start - done)
        if done is not None:
            committed[window] = done + step.commit_count
    return counts


def _positions_to_score(window_masked: torch.Tensor, masked_count: int | None) -> torch.Tensor:
    """LongTensor [B, K]: window positions worth scoring, in increasing order: the masked
    ones when every row has `masked_count` of them (committed tokens never change), else all.
    Sorting, rather than selecting, keeps the device from waiting on the host."""
    batch, width = window_masked.shape
    every = torch.arange(width, device=window_masked.device).expand(batch, width)
    if masked_count is None or masked_count == width:
        return every
    unmasked_last = (~window_masked).to(torch.uint8)
    return unmasked_last.argsort(dim=1, stable=True)[:, :masked_count]


def _denoise_positions(
    logits: torch.Tensor,
    masked: torch.Tensor,
    step: DenoisingStep,
    settings: DiffusionSamplerSettings,
    mask_token_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw tokens for positions [B, K] and choose which masked ones to commit."""
    needs_confidence = step.transfer_prob is None and settings.remasking == "low_confidence"
    statistic = settings.alg if needs_confidence and settings.alg != "origin" else None
    tokens, statistic_value = score_positions(logits, settings, mask_token_id, generator, statistic)
    if step.transfer_prob is not None:
        commit = masked & (_uniform(masked.shape, generator, masked.device) < step.transfer_prob)
        return commit, tokens
    if statistic is None:
        confidence = _uniform(masked.shape, generator, masked.device)
    else:
        confidence = statistic_value
    commit = _tokens_to_commit(confidence, masked, step.commit_count, settings.alg_temp, generator)
    return commit, tokens


def score_positions(
    logits: torch.Tensor,
    settings: DiffusionSamplerSettings,
    mask_token_id: int,
    generator: torch.Generator,
    statistic: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(drawn token, confidence `statistic` of its distribution or None), each [B, K], from
    logits [B, K, V]; the mask token is never drawn. Rows are scored in chunks of at most
    `SCORING_CHUNK_ELEMENTS` logits."""
    batch, width, vocab = logits.shape
    flat = logits.reshape(batch * width, vocab)
    chunk_rows = max(1, SCORING_CHUNK_ELEMENTS // vocab)
    tokens, statistics = [], []
    for chunk in flat.split(chunk_rows):
        chunk_tokens, chunk_statistic = _score_rows(chunk, settings, mask_token_id, generator, statistic)
        tokens.append(chunk_tokens)
        statistics.append(chunk_statistic)
    shape = (batch, width)
    statistic_value = torch.cat(statistics).reshape(shape) if statistic is not None else None
    return torch.cat(tokens).reshape(shape), statistic_value


def _score_rows(
    logits: torch.Tensor,
    settings: DiffusionSamplerSettings,
    mask_token_id: int,
    generator: torch.Generator,
    statistic: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`score_positions` on rows [R, V]: one float32 copy of the logits, changed in place."""
    scaled = logits.to(torch.float32, copy=True)
    scaled[:, [mask_token_id, *settings.suppressed_token_ids]] = float("-inf")
    if settings.temperature:
        scaled.div_(settings.temperature)
    if _nucleus_route_applies(settings, scaled.shape[-1]):
        candidates = _nucleus_candidates(scaled, settings.top_p)
        if candidates is not None:
            return _score_candidates(*candidates, generator, statistic)
    probs = token_probabilities(scaled, None, settings.top_p, settings.top_k)
    del scaled
    token_prob, tokens = _sample_tokens(probs, settings.greedy, generator)
    if statistic is None:
        return tokens, None
    if settings.confidence_excluded_token_ids:
        probs = _without_tokens(probs, settings.confidence_excluded_token_ids)
        token_prob = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, _confidence(statistic, probs, token_prob, generator)


def _without_tokens(probs: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """`probs` [R, V] with `token_ids` set to 0 and the rest renormalised (a row that held
    nothing else keeps its zeros)."""
    kept = probs.clone()
    kept[:, list(token_ids)] = 0
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)


def _nucleus_route_applies(settings: DiffusionSamplerSettings, vocab: int) -> bool:
    """Sampling with top-p alone over a vocabulary larger than the candidates. Greedy
    sampling keeps the full route, whose argmax breaks ties by token id."""
    return (not settings.greedy and settings.top_p is not None and settings.top_p < 1
            and settings.top_k is None and vocab > NUCLEUS_CANDIDATES and not settings.confidence_excluded_token_ids)


def _nucleus_candidates(scaled: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(filtered logits [R, C], their tokens [R, C]) of the `NUCLEUS_CANDIDATES` most probable
    tokens, outside the nucleus -inf, or None when some row's nucleus is larger. The same
    nucleus as `top_p_filter`; costs one host synchronisation."""
    values, order = scaled.topk(NUCLEUS_CANDIDATES, dim=-1)
    cumulative = (values - scaled.logsumexp(dim=-1, keepdim=True)).exp().cumsum(dim=-1)
    if not bool((cumulative[:, -1] >= top_p).all()):
        return None
    keep = F.pad(cumulative[:, :-1], (1, 0)) < top_p
    return values.masked_fill(~keep, float("-inf")), order


def _score_candidates(
    filtered: torch.Tensor, order: torch.Tensor, generator: torch.Generator, statistic: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw and confidence from candidate logits [R, C] sorted in decreasing order; tokens
    outside them have probability 0, so entropy and margin are the full distribution's."""
    probs = torch.softmax(filtered, dim=-1)
    token_prob, choice = _sample_tokens(probs, greedy=False, generator=generator)
    tokens = order.gather(-1, choice[:, None]).squeeze(-1)
    if statistic is None:
        return tokens, None
    if statistic == "topk_margin":  # candidates are sorted, so the top two are the first two
        return tokens, probs[:, 0] - probs[:, 1]
    return tokens, _confidence(statistic, probs, token_prob, generator)


def token_probabilities(
    logits: torch.Tensor, temperature: float | None, top_p: float | None, top_k: int | None
) -> torch.Tensor:
    """softmax after temperature, then top-p, then top-k filtering (Dream's order)."""
    if temperature:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return torch.softmax(logits, dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probability reaches `top_p`;
    the rest get -inf. A token is kept when the mass strictly before it is below top_p.

    At real vocabulary sizes a full sort per step costs more than the model's forward
    pass, so the nucleus is first sought among the `candidates` most probable tokens; only
    when some row's nucleus is larger is the whole vocabulary sorted. Both routes keep the
    same set; choosing between them costs one host synchronisation.
    """
    if logits.shape[-1] > candidates:
        values, order = logits.topk(candidates, dim=-1)
        cumulative = (values - logits.logsumexp(dim=-1, keepdim=True)).exp().cumsum(dim=-1)
        if bool((cumulative[..., -1] >= top_p).all()):
            return _keep_nucleus(logits, cumulative, order, top_p)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    return _keep_nucleus(logits, sorted_logits.softmax(dim=-1).cumsum(dim=-1), order, top_p)


def _keep_nucleus(
    logits: torch.Tensor, cumulative: torch.Tensor, order: torch.Tensor, top_p: float
) -> torch.Tensor:
    """`cumulative[..., j]` is the probability of the j+1 most probable tokens `order[..., :j+1]`;
    tokens outside `order` are dropped."""
    keep_sorted = F.pad(cumulative[..., :-1], (1, 0)) < top_p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep exactly the `top_k` largest logits (ties broken by topk); the rest get -inf."""
    top_k = min(top_k, logits.shape[-1])
    kept = logits.topk(top_k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, kept, True)
    return logits.masked_fill(~keep, float("-inf"))


def _sample_tokens(
    probs: torch.Tensor, greedy: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the chosen token, chosen token) per position: argmax when greedy,
    else a categorical draw (argmax of probs / Exp(1) noise, which needs no host sync)."""
    if greedy:
        return probs.max(dim=-1)
    noise = torch.empty(probs.shape, device=generator.device).exponential_(generator=generator)
    # a zero draw would turn a zero-probability token into 0/0 = NaN, which argmax would pick
    noise = noise.clamp_min_(torch.finfo(noise.dtype).tiny).to(probs.device)
    tokens = (probs / noise).argmax(dim=-1)
    return probs.gather(-1, tokens[..., None]).squeeze(-1), tokens


def _confidence(
    alg: str, probs: torch.Tensor, token_prob: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Per-position confidence [B, S]; higher is committed first."""
    if alg == "maskgit_plus":
        return token_prob
    if alg == "topk_margin":
        top_two = probs.topk(2, dim=-1).values
        return top_two[..., 0] - top_two[..., 1]
    if alg == "entropy":
        return -torch.special.entr(probs).sum(dim=-1)
    if alg == "origin":
        return _uniform(token_prob.shape, generator, token_prob.device)
    raise ValueError(f"alg must be one of {ALGORITHMS}, got {alg!r}")


def _tokens_to_commit(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    count: int,
    alg_temp: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Boolean [B, S]: the `count` masked positions per row with the highest confidence, or,
    with alg_temp, `count` positions drawn without replacement from softmax(confidence /
    alg_temp) (Gumbel-top-k, which has that distribution). Only masked positions qualify;
    the schedule guarantees count <= masked positions per row."""
    commit = torch.zeros_like(masked)
    if count == 0:
        return commit
    scores = confidence.masked_fill(~masked, float("-inf"))
    if alg_temp:
        scores = scores / alg_temp + _gumbel(scores.shape, generator, scores.device)
    return commit.scatter(-1, scores.topk(count, dim=-1).indices, True)


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _gumbel(shape, generator: torch.Generator, device) -> torch.Tensor:
    uniform = _uniform(shape, generator, device).clamp_(torch.finfo(torch.float32).tiny, 1.0)
    return -torch.log(-torch.log(uniform))


def truncate_at_stop(
    token_ids: Sequence[int] | torch.Tensor,
    stop_token_ids: Iterable[int],
    *,
    mask_token_id: int | None = None,
) -> list[int]:
    """The answer: tokens before the first stop token (e.g. eos, `<|im_end|>`). A mask token
    left in the answer also ends it, since nothing after it was decided in context."""
    tokens = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    stops = set(stop_token_ids)
    if mask_token_id is not None:
        stops.add(mask_token_id)
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens


# --------------------------------------------------------------------------- the published harness

PUBLISHED_MAX_PROMPT_TOKENS = 1024  # the harness keeps a prompt's last 1024 tokens
PUBLISHED_ENTROPY_EPSILON = 1e-10


def coda_published_generate(
    logits_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompt_ids: torch.Tensor,
    settings: DiffusionSamplerSettings,
    mask_token_id: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """CoDA's sampler as its published evaluation runs it (CoDALanguageModel/generation_utils.py,
    `_sample`, called by evaluation/lm_eval/lm_eval/models/diffllm.py); returns the answer region,
    LongTensor [B, max_new_tokens].

    `logits_at(ids, positions)` returns logits [B, K, V] at columns `positions` [B, K] of the whole
    sequence, shifted as the model reads them, with every position (pads included) visible, in the
    model's dtype. Each of the `steps` steps scores every masked position of every row, draws a
    token and a confidence for each (`published_scores`), and commits the int(batch-mean masked
    count x (1 - s/t)) most confident positions of each row (all at the last step), chosen by
    top-k over the whole row, where positions not masked have confidence -inf: a row with fewer
    masked positions than that count has unmasked positions overwritten with the mask token, as
    in the harness. A drawn mask token leaves its position masked. Under alg `origin` each
    masked position instead draws its token with probability 1 - s/t (1 at the last step).
    """
    _require(settings.block_length is None, "the published harness denoises the answer as one block")
    batch, prompt_length = prompt_ids.shape
    ids = torch.cat([prompt_ids, prompt_ids.new_full((batch, settings.max_new_tokens), mask_token_id)], dim=1)
    timesteps = torch.linspace(1, settings.eps, settings.steps + 1, device=ids.device)
    for step in range(settings.steps):
        masked = ids == mask_token_id
        columns = masked.any(dim=0).nonzero().squeeze(1)
        if columns.numel() == 0:
            break  # nothing left to denoise: the remaining steps would change nothing
        logits = logits_at(ids, columns.expand(batch, -1))
        masked_logits = logits[masked[:, columns]]
        t, s = timesteps[step], timesteps[step + 1]
        if settings.alg == "origin":
            _published_origin_step(ids, masked, masked_logits, 1 - s / t if step < settings.steps - 1 else 1,
                                   settings, mask_token_id, generator)
            continue
        confidence, tokens = published_scores(masked_logits, settings, generator)
        masked_mean = masked.sum() / batch
        count = int(masked_mean * (1 - s / t)) if step < settings.steps - 1 else int(masked_mean)
        if count == 0:
            continue
        row_confidence = torch.full(ids.shape, float("-inf"), dtype=logits.dtype, device=ids.device)
        row_confidence[masked] = confidence.to(logits.dtype)
        chosen = _published_positions(row_confidence, count, settings.alg_temp, generator)
        proposal = torch.full_like(ids, mask_token_id)
        proposal[masked] = tokens
        ids.scatter_(1, chosen, proposal.gather(1, chosen))
    return ids[:, prompt_length:]


def _published_origin_step(ids: torch.Tensor, masked: torch.Tensor, masked_logits: torch.Tensor, transfer_prob,
                           settings: DiffusionSamplerSettings, mask_token_id: int, generator: torch.Generator) -> None:
    """The harness's `origin` rule, in place: each masked position draws a token with
    probability `transfer_prob` (the rest stay masked)."""
    transfer = _uniform((masked_logits.shape[0],), generator, ids.device) < transfer_prob
    proposal = torch.full((masked_logits.shape[0],), mask_token_id, dtype=ids.dtype, device=ids.device)
    if bool(transfer.any()):
        proposal[transfer] = published_scores(masked_logits[transfer], settings, generator)[1]
    ids[masked] = proposal


def _published_positions(row_confidence: torch.Tensor, count: int, alg_temp: float | None,
                         generator: torch.Generator) -> torch.Tensor:
    if not alg_temp:
        return row_confidence.topk(count, dim=-1).indices
    weights = torch.softmax(row_confidence / alg_temp, dim=-1).float()
    return torch.multinomial(weights.to(generator.device), count, generator=generator).to(row_confidence.device)


def published_scores(
    logits: torch.Tensor, settings: DiffusionSamplerSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of logits [M, V], computed as the harness computes them: in
    the logits' own dtype, any token (the mask token too) drawable. Rows are scored in chunks of
    at most `SCORING_CHUNK_ELEMENTS` logits; each row's result depends on that row alone."""
    chunk_rows = max(1, SCORING_CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    scored = [_published_score_rows(chunk, settings, generator) for chunk in logits.split(chunk_rows)]
    if not scored:
        return logits.new_empty((0,)), torch.empty((0,), dtype=torch.long, device=logits.device)
    return torch.cat([c for c, _ in scored]), torch.cat([t for _, t in scored])


def _published_score_rows(logits: torch.Tensor, settings: DiffusionSamplerSettings, generator: torch.Generator):
    if settings.temperature:
        logits = logits / settings.temperature
    lowest = torch.finfo(logits.dtype).min
    if settings.top_p is not None and settings.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = F.pad(mass[..., :-1] > settings.top_p, (1, 0), value=False)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), lowest)
    if settings.top_k is not None:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    probs = torch.softmax(logits, dim=-1)
    if settings.greedy:
        confidence, tokens = probs.max(dim=-1)
    else:
        normalised = probs / probs.sum(dim=-1, keepdim=True)
        noise = torch.empty(probs.shape, device=generator.device).exponential_(generator=generator)
        noise = noise.clamp_min_(torch.finfo(noise.dtype).tiny).to(probs.device)
        tokens = (normalised.float() / noise).argmax(dim=-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    if settings.alg == "topk_margin":
        top_two = probs.sort(dim=-1, descending=True).values[:, :2]
        confidence = top_two[:, 0] - top_two[:, 1]
    elif settings.alg == "entropy":
        confidence = (probs * torch.log(probs + PUBLISHED_ENTROPY_EPSILON)).sum(dim=-1)
    return confidence, tokens


def published_answer_text(tokenizer, answer_ids: torch.Tensor) -> tuple[str, int]:
    """(text, token count) of an answer as the harness cuts it: decoded with its special tokens,
    up to the first eos text; the count is of the tokens before the first eos token."""
    tokens = answer_ids.tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=False).split(tokenizer.eos_token)[0]
    return text, len(truncate_at_stop(tokens, {tokenizer.eos_token_id}))


# --------------------------------------------------------------------------- answers from a model

def warm_up_settings(generation):
    """One denoising step per block over the whole answer window: the shapes of every step."""
    import dataclasses

    blocks = generation.max_new_tokens // generation.block_length if generation.block_length else 1
    return dataclasses.replace(generation, steps=blocks)


def auto_batch_size(model, device: str, cap: int = 32) -> int:
    """As many rows as free device memory holds for a forward over the answer window (8 on a CPU):
    about a dozen hidden-state-sized activations per token and layer in flight."""
    from qrobust.tasks.decoding import rows_that_fit

    config = model.config
    bytes_per_token = 12 * config.hidden_size * next(model.parameters()).element_size()
    return rows_that_fit(device, bytes_per_token, cap)


def sampler_settings(generation, logits_shift: bool, tokenizer=None) -> "DiffusionSamplerSettings":
    """The sampler settings of a grid's generation table; `tokenizer` turns the token names it
    suppresses or excludes from confidence into ids (needed only when it names any)."""
    return DiffusionSamplerSettings(
        max_new_tokens=generation.max_new_tokens,
        steps=generation.steps,
        alg=generation.alg,
        temperature=generation.temperature or None,
        top_p=generation.top_p,
        top_k=generation.top_k,
        alg_temp=generation.alg_temp,
        eps=generation.eps,
        block_length=generation.block_length,
        logits_shift=logits_shift,
        suppressed_token_ids=token_ids(generation.suppressed_tokens, tokenizer, "suppressed_tokens"),
        confidence_excluded_token_ids=token_ids(
            generation.confidence_excluded_tokens, tokenizer, "confidence_excluded_tokens"),
    )


def token_ids(tokens: tuple[str, ...], tokenizer, setting: str) -> tuple[int, ...]:
    """The ids of tokens named by their text; a name the tokenizer does not hold is an error."""
    if not tokens:
        return ()
    if tokenizer is None:
        raise ValueError(f"generation {setting} names tokens; their ids need the model's tokenizer")
    vocabulary = tokenizer.get_vocab()
    unknown = [token for token in tokens if token not in vocabulary]
    if unknown:
        raise ValueError(f"generation {setting} names {unknown[0]!r}, which is not a token of this model's tokenizer")
    return tuple(vocabulary[token] for token in tokens)


def answers(model, tokenizer, prompts: list[str], generation, checkpoint, seed: int, stop_strings=()):
    """Answers to a batch of prompts from a diffusion model: (texts cut at eos, token counts).

    The stop strings are the prompt format's: the answer region is denoised whole, then cut at
    eos; the format's post-processing applies the stop strings (`tasks.benchmarks.postprocess`).
    `generation.harness` picks the row-independent sampler or the published one."""
    if generation.harness == "coda-published":
        return published_answers(model, tokenizer, prompts, generation, checkpoint, seed)
    from qrobust.tasks.models.diffusion import diffusion_logits_at

    shift = checkpoint.logits_shift
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.inference_mode():
        # the sampler asks only for the positions it scores: lm_head runs on those alone
        tokens = diffusion_generate(
            lambda ids, mask, positions: diffusion_logits_at(model, ids, mask, positions, shift),
            encoded["input_ids"],
            encoded["attention_mask"],
            sampler_settings(generation, shift, tokenizer),
            checkpoint.mask_token_id,
            generator,
            logits_at_positions=True,
        )
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    answers = [truncate_at_stop(row, stops, mask_token_id=checkpoint.mask_token_id) for row in tokens]
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers], [len(a) for a in answers]


def published_answers(model, tokenizer, prompts: list[str], generation, checkpoint, seed: int):
    """Answers as CoDA's published harness produces them (see `coda_published_generate`): prompts
    tokenised as the harness does (left padded, the tokenizer's own special tokens, the last
    `PUBLISHED_MAX_PROMPT_TOKENS` kept), pads visible to every position."""
    from qrobust.tasks.models.diffusion import pads_visible_logits_at

    shift = checkpoint.logits_shift
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    prompt_ids = encoded["input_ids"][:, -PUBLISHED_MAX_PROMPT_TOKENS:].to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.inference_mode():
        tokens = coda_published_generate(
            lambda ids, positions: pads_visible_logits_at(model, ids, positions, shift),
            prompt_ids, sampler_settings(generation, shift), checkpoint.mask_token_id, generator,
        )
    texts, counts = zip(*(published_answer_text(tokenizer, row) for row in tokens))
    return list(texts), list(counts)
