"""Auto-regressive decoding of a batch of prompts, greedy or sampled, with a static KV cache.

Prompts are left-padded into one batch. The prompt fills the first slots of a static cache
(`transformers.StaticCache`, sized to prompt plus answer, rounded up to 64 slots); each step
then feeds one token per row with an explicit mask of the slots that row may see (its real
prompt tokens and what it generated), so padding never leaks and the step's tensors keep their
shapes. On a GPU a greedy step is captured once as a CUDA graph and replayed: one launch per
token instead of hundreds, which is what makes batch-1 decoding fast. Rows stop at eos; stop
strings are checked on the host every `STOP_CHECK_EVERY` tokens, outside the graph, and an
answer is cut right after the token that completes one (as the format's post-processing would
cut it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

STOP_CHECK_EVERY = 16
CACHE_ALIGNMENT = 64


def answers(model, tokenizer, prompts: list[str], generation, checkpoint, seed: int, stop_strings: tuple[str, ...]):
    """Answers to a batch of prompts, decoded left to right: (texts, generated token counts)."""
    import torch

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    sampler = TokenSampler(generation.temperature, generation.top_p, generation.top_k, seed, model.device)
    with torch.inference_mode():
        tokens = static_cache_decode(model, encoded["input_ids"], encoded["attention_mask"],
                                     generation.max_new_tokens, sampler, end_ids,
                                     StopStrings(tokenizer, stop_strings))
    texts, counts = [], []
    for row in tokens:
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
        counts.append(len(row))
    return texts, counts


def warm_up_settings(generation):
    """A short run at the batch's shapes: prefill, a step, the first-use costs of both."""
    import dataclasses

    return dataclasses.replace(generation, max_new_tokens=2)


def auto_batch_size(model, device: str, cap: int = 64) -> int:
    """As many rows as free device memory holds for their KV caches (8 on a CPU)."""
    from qrobust.tasks.decoding import rows_that_fit

    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()
    return rows_that_fit(device, bytes_per_token, cap)


@dataclass
class TokenSampler:
    """The next token from the last position's logits: argmax, or a draw after temperature,
    top-k and top-p from this batch's own generator."""

    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int
    device: object

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def __call__(self, logits):
        import torch

        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) > self.top_p  # keep the smallest prefix reaching top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)


class StopStrings:
    """Where each row's answer ends: at an end token, or right after the token that completes a
    stop string."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)

    def end(self, tokens: list[int], end_ids: set[int]) -> int | None:
        """The length of the answer within `tokens`, or None if it has not ended yet."""
        for index, token in enumerate(tokens):
            if token in end_ids:
                return index
        if not self.stop_strings:
            return None
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if not any(stop in text for stop in self.stop_strings):
            return None
        for index in range(1, len(tokens) + 1):  # the first token after which a stop string is there
            prefix = self.tokenizer.decode(tokens[:index], skip_special_tokens=True)
            if any(stop in prefix for stop in self.stop_strings):
                return index
        return None


def static_cache_decode(model, input_ids, attention_mask, max_new_tokens: int, sampler: TokenSampler,
                        end_ids: set[int], stops: StopStrings) -> list[list[int]]:
    """Each row's answer tokens (without its end token)."""
    import torch

    batch, prompt_len = input_ids.shape
    state = DecodeState.start(model, input_ids, attention_mask, max_new_tokens, sampler)
    step = _graphed(state, model, sampler) if _can_graph(model, sampler) else (lambda: state.step(model, sampler))
    ends: list[int | None] = [None] * batch
    produced = 1  # the prefill produced the first token
    while produced < max_new_tokens:
        step()
        produced += 1
        if produced % STOP_CHECK_EVERY == 0 and _all_ended(state.answers(produced), ends, end_ids, stops):
            break
    final = state.answers(produced)
    _all_ended(final, ends, end_ids, stops)
    return [row[: end if end is not None else len(row)] for row, end in zip(final, ends)]


def _all_ended(rows: list[list[int]], ends: list[int | None], end_ids: set[int], stops: StopStrings) -> bool:
    for index, row in enumerate(rows):
        if ends[index] is None:
            ends[index] = stops.end(row, end_ids)
    return all(end is not None for end in ends)


@dataclass
class DecodeState:
    """Device tensors one decode step reads and updates in place (so that it can be replayed as a
    CUDA graph): the token to feed, its position, the cache slots each row may see, the answer so far."""

    cache: object
    token: "torch.Tensor"  # [B, 1]
    position: "torch.Tensor"  # [B, 1] the row's own position (its real tokens so far)
    slot: "torch.Tensor"  # [1] the cache slot the fed token goes into (the same for every row)
    visible: "torch.Tensor"  # [B, max_len] slots a row's queries may attend to
    slots: "torch.Tensor"  # [max_len] 0..max_len-1
    generated: "torch.Tensor"  # [B, max_new_tokens]
    count: "torch.Tensor"  # [1] tokens written to `generated`

    @classmethod
    def start(cls, model, input_ids, attention_mask, max_new_tokens: int, sampler: TokenSampler) -> "DecodeState":
        """Fill the cache with the prompt and draw the first answer token."""
        import torch
        from transformers import StaticCache

        batch, prompt_len = input_ids.shape
        device = input_ids.device
        max_len = -(-(prompt_len + max_new_tokens) // CACHE_ALIGNMENT) * CACHE_ALIGNMENT
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        slots = torch.arange(max_len, device=device)
        visible = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        visible[:, :prompt_len] = attention_mask.bool()
        causal = slots[None, :] <= torch.arange(prompt_len, device=device)[:, None]  # [P, max_len]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        output = model(input_ids=input_ids, attention_mask=visible[:, None, None, :] & causal[None, None],
                       position_ids=positions, use_cache=True, logits_to_keep=1, **{_cache_keyword(model): cache})
        generated = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        token = sampler(output.logits[:, -1])
        generated[:, :1] = token
        return cls(cache=cache, token=token, position=positions[:, -1:] + 1,
                   slot=torch.full((1,), prompt_len, device=device, dtype=torch.long), visible=visible, slots=slots,
                   generated=generated, count=torch.ones(1, device=device, dtype=torch.long))

    def step(self, model, sampler: TokenSampler) -> None:
        """Feed the current token, draw the next one, advance."""
        self.visible |= self.slots == self.slot
        output = model(input_ids=self.token, attention_mask=self.visible[:, None, None, :],
                       position_ids=self.position, use_cache=True, **{_cache_keyword(model): self.cache})
        self.token.copy_(sampler(output.logits[:, -1]))
        self.generated.scatter_(1, self.count.expand(self.token.shape[0], 1), self.token)
        self.position.add_(1)
        self.slot.add_(1)
        self.count.add_(1)

    def answers(self, produced: int) -> list[list[int]]:
        return self.generated[:, :produced].tolist()


def _can_graph(model, sampler: TokenSampler) -> bool:
    """CUDA graphs for greedy steps on a GPU (a sampled step draws from a generator the graph
    would have to own)."""
    return sampler.greedy and model.device.type == "cuda"


def _graphed(state: DecodeState, model, sampler: TokenSampler):
    """`state.step` captured as a CUDA graph, after a warm-up step on a side stream as capture requires;
    returns the replay function (the warm-up step counts as the first replayed one)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        state.step(model, sampler)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step; nothing runs until a replay
        state.step(model, sampler)
    warmed = [True]

    def replay() -> None:
        if warmed[0]:  # the side-stream warm-up already made this step
            warmed[0] = False
            return
        graph.replay()

    return replay


def _cache_keyword(model) -> str:
    """The forward's name for the KV cache (transformers renamed past_key_values to cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
