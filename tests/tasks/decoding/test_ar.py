"""Static-cache decoding gives the answers transformers' own generate gives, row by row."""

from __future__ import annotations

import pytest
import torch

from qrobust.tasks.benchmarks import benchmark_format, load_problems, postprocess, render_prompt
from qrobust.tasks.config import BenchmarkSpec, GenerationSpec, TinyArchitecture
from qrobust.tasks.decoding import ar


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from qrobust.tasks.models.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(1024)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return build_tiny_model(TinyArchitecture(num_hidden_layers=2), tokenizer).eval(), tokenizer


@pytest.fixture(scope="module")
def problems():
    return load_problems(BenchmarkSpec("humaneval", limit=6))


@pytest.fixture(scope="module")
def prompts(problems):
    fmt = benchmark_format("humaneval", "completion")
    return [render_prompt(p, fmt) for p in problems]


def _reference(model, tokenizer, prompts, max_new_tokens):
    """transformers' eager generate, greedy, cut at the end token."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in output[:, encoded["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)), len(row))
        rows.append(row[:end])
    return rows


def test_greedy_answers_in_a_padded_batch_equal_transformers_generate(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    texts, counts = ar.answers(model, tokenizer, prompts, GenerationSpec(max_new_tokens=40), None, 0, ())
    reference = _reference(model, tokenizer, prompts, 40)
    assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in reference]
    assert counts == [len(row) for row in reference]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # the batch really is padded


def test_a_row_stops_right_after_the_token_that_completes_a_stop_string(model_and_tokenizer, prompts, problems):
    model, tokenizer = model_and_tokenizer
    fmt = benchmark_format("humaneval", "completion")
    free, _ = ar.answers(model, tokenizer, prompts, GenerationSpec(max_new_tokens=48), None, 0, ())
    stopped, counts = ar.answers(model, tokenizer, prompts, GenerationSpec(max_new_tokens=48), None, 0,
                                 fmt.stop_strings)
    for whole, cut, problem in zip(free, stopped, problems):
        assert whole.startswith(cut) and postprocess(cut, fmt, problem) == postprocess(whole, fmt, problem)
        if any(stop in cut for stop in fmt.stop_strings):
            shorter = tokenizer.decode(tokenizer(cut, add_special_tokens=False)["input_ids"][:-1])
            assert not any(stop in shorter for stop in fmt.stop_strings)


def test_sampled_answers_are_reproducible_and_depend_on_the_seed(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    settings = GenerationSpec(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, n_samples=2)
    first, _ = ar.answers(model, tokenizer, prompts, settings, None, 3, ())
    again, _ = ar.answers(model, tokenizer, prompts, settings, None, 3, ())
    other, _ = ar.answers(model, tokenizer, prompts, settings, None, 4, ())
    assert first == again and first != other


def test_top_k_of_one_samples_the_argmax(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    greedy, _ = ar.answers(model, tokenizer, prompts, GenerationSpec(max_new_tokens=16), None, 0, ())
    one, _ = ar.answers(model, tokenizer, prompts,
                        GenerationSpec(max_new_tokens=16, temperature=0.7, top_k=1), None, 5, ())
    assert one == greedy
