import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

from qrobust.tasks.benchmarks import benchmark_format, load_problems
from qrobust.tasks.config import ConfigError, ModelSpec, TinyArchitecture, TrainingSpec
from qrobust.tasks.grid_file import load_grid, parse_grid
from tests.pipeline import prepare as prepare_model
from qrobust.tasks.models.tiny import save_tiny
from qrobust.tasks.models.training import (
    ar_batch,
    completion_text,
    diffusion_batch,
    step_loss,
    train_tiny_model,
    training_problems,
    training_sequences,
)
from qrobust.tasks.runtime.workspace import Workspace

ARCH = TinyArchitecture(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
)
SPEC = TrainingSpec(steps=30, batch_size=2, humaneval_problems=2, mbpp_problems=2, max_new_tokens=48)
MAX_NEW_TOKENS = SPEC.max_new_tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    save_tiny(ARCH, directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


@pytest.fixture(scope="module")
def problems():
    return training_problems(SPEC)


def train(base, out, family="diffusion", spec=SPEC):
    return train_tiny_model(base, family, spec, training_problems(spec), MAX_NEW_TOKENS, None, out, progress=False)


def weights(directory):
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """Both families trained once with SPEC: {family: (directory, stats)}."""
    runs = {}
    for family in ("ar", "diffusion"):
        out = tmp_path_factory.mktemp(family)
        runs[family] = out, train(base, out, family)
    return runs


def test_training_twice_with_the_same_seed_gives_bitwise_identical_weights(base, trained, tmp_path):
    again = tmp_path / "again"
    train(base, again, "diffusion")
    first, second = weights(trained["diffusion"][0]), weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("vector_width", ["avx2", "avx512"])
def test_weights_trained_in_the_portable_process_do_not_depend_on_the_callers_cpu_settings(base, tmp_path,
                                                                                            monkeypatch, vector_width):
    from qrobust.tasks.models.training import train_in_portable_process

    spec = dataclasses.replace(SPEC, steps=10)
    reference = tmp_path / "reference"
    train_in_portable_process(base, "ar", spec, MAX_NEW_TOKENS, None, reference)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", vector_width)  # what a caller on another CPU would have
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    other = tmp_path / vector_width
    train_in_portable_process(base, "ar", spec, MAX_NEW_TOKENS, None, other)
    first, second = weights(reference), weights(other)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_vector_width_changes_weights_trained_without_the_portable_settings(base, tmp_path):
    """Why training gets a process of its own: the same training under two vector widths."""
    import subprocess
    import sys

    hashes = []
    for vector_width in ("avx2", "default"):
        out = tmp_path / vector_width
        script = (
            "import sys, dataclasses; from pathlib import Path; "
            "from tests.tasks.models.test_training import SPEC, MAX_NEW_TOKENS; "
            "from qrobust.tasks.models.training import train_tiny_model, training_problems; "
            "spec = dataclasses.replace(SPEC, steps=10); "
            "train_tiny_model(Path(sys.argv[1]), 'ar', spec, training_problems(spec), MAX_NEW_TOKENS, None, "
            "Path(sys.argv[2]), progress=False)"
        )
        subprocess.run([sys.executable, "-c", script, str(base), str(out)], check=True,
                       env={**os.environ, "ATEN_CPU_CAPABILITY": vector_width})
        hashes.append(weights(out))
    assert any(not torch.equal(hashes[0][name], hashes[1][name]) for name in hashes[0])


def test_a_different_seed_gives_different_weights(base, trained, tmp_path):
    other = tmp_path / "other"
    train(base, other, "diffusion", dataclasses.replace(SPEC, seed=1))
    first, second = weights(trained["diffusion"][0]), weights(other)
    assert any(not torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("family", ["ar", "diffusion"])
def test_training_lowers_the_loss(trained, family):
    stats = trained[family][1]
    assert stats["steps"] == SPEC.steps
    assert stats["final_loss"] < 0.8 * stats["initial_loss"]


def test_training_changes_the_base_weights_and_saves_them_in_float32(base, trained):
    before, after = weights(base), weights(trained["ar"][0])
    assert all(tensor.dtype == torch.float32 for tensor in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_both_families_start_from_the_same_weights_and_have_the_same_parameter_count(trained):
    ar, diffusion = (weights(trained[f][0]) for f in ("ar", "diffusion"))
    assert trained["ar"][1]["base_weights_sha256"] == trained["diffusion"][1]["base_weights_sha256"]
    assert {n: t.shape for n, t in ar.items()} == {n: t.shape for n, t in diffusion.items()}


def test_diffusion_batch_puts_the_answer_and_its_eos_fill_in_a_region_of_max_new_tokens(problems, tokenizer):
    sequences = training_sequences(problems, tokenizer)
    input_ids, attention_mask, loss_mask = diffusion_batch(
        sequences, MAX_NEW_TOKENS, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    prompt_length = input_ids.shape[1] - MAX_NEW_TOKENS
    assert loss_mask[:, prompt_length:].all() and not loss_mask[:, :prompt_length].any()
    assert attention_mask[:, prompt_length:].all()
    for row, sequence in enumerate(sequences):
        answer = input_ids[row, prompt_length:].tolist()
        assert answer[: len(sequence.answer_ids)] == list(sequence.answer_ids)
        assert set(answer[len(sequence.answer_ids) :]) <= {tokenizer.eos_token_id}
        prompt = input_ids[row, :prompt_length][attention_mask[row, :prompt_length].bool()]
        assert prompt.tolist() == list(sequence.prompt_ids)


def test_diffusion_training_masks_and_scores_only_answer_positions(base, problems, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    sequences = training_sequences(problems, tokenizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        step_loss(model, "diffusion", sequences, MAX_NEW_TOKENS, tokenizer, tokenizer.mask_token_id, True, generator)
    masked = torch.stack(seen) == tokenizer.mask_token_id
    assert masked[..., -MAX_NEW_TOKENS:].any()
    assert not masked[..., :-MAX_NEW_TOKENS].any()


def test_ar_labels_are_the_answer_tokens_only(problems, tokenizer):
    sequences = training_sequences(problems, tokenizer)
    input_ids, attention_mask, labels = ar_batch(sequences, tokenizer.pad_token_id)
    for row, sequence in enumerate(sequences):
        scored = labels[row][labels[row] != -100].tolist()
        assert scored == list(sequence.answer_ids)
        assert scored[-1] == tokenizer.eos_token_id
        assert input_ids[row, : attention_mask[row].sum()].tolist() == list(sequence.prompt_ids + sequence.answer_ids)


def test_training_sequences_are_the_generation_prompts_followed_by_the_reference_answers(problems, tokenizer):
    from qrobust.tasks.stages.generate import prompts_for

    grid = load_grid("tiny")
    sequences = {s.task_id: s for s in training_sequences(problems, tokenizer)}
    for benchmark in grid.benchmarks:
        selected = [p for p in problems if p.benchmark == benchmark.name]
        cell = next(c for c in grid.cells() if c.benchmark == benchmark)
        fmt = benchmark_format(benchmark.name, cell.model.prompt_style)
        for problem, prompt in zip(selected, prompts_for(selected, fmt, tokenizer)):
            sequence = sequences[problem.task_id]
            assert list(sequence.prompt_ids) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(sequence.answer_ids[:-1]) == completion_text(problem)


def test_an_answer_longer_than_max_new_tokens_is_refused(base, problems, tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens 4 is too small"):
        train_tiny_model(base, "ar", SPEC, problems, 4, None, tmp_path, progress=False)


def test_default_grid_evaluates_exactly_the_problems_its_models_memorise():
    grid = load_grid("tiny")
    for model in grid.models:
        assert model.training is not None
        memorised = {p.task_id for p in training_problems(model.training)}
        evaluated = {p.task_id for b in grid.benchmarks for p in load_problems(b)}
        assert evaluated == memorised


def test_grid_refuses_a_trained_model_whose_answer_region_differs_from_generation():
    text = """
[[models]]
name = "tiny-ar"
training = { max_new_tokens = 32 }
[[methods]]
name = "fp"
[[benchmarks]]
name = "humaneval"
[generation]
max_new_tokens = 48
"""
    with pytest.raises(ConfigError, match="training.max_new_tokens 32 differs from .*max_new_tokens 48"):
        parse_grid(text)
    assert parse_grid(text.replace("32", "48")).models[0].training.max_new_tokens == 48


def trained_spec(family: str) -> ModelSpec:
    return ModelSpec(name=f"tiny-{family}", family=family, tiny=ARCH, training=dataclasses.replace(SPEC, steps=3))


def test_prepare_model_trains_once_and_then_returns_the_cached_checkpoint(tmp_path, monkeypatch):
    import qrobust.tasks.models.training

    workspace = Workspace.at(tmp_path)
    first = prepare_model(trained_spec("diffusion"), workspace)
    assert first.training["steps"] == 3

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached checkpoint was retrained")

    monkeypatch.setattr(qrobust.tasks.models.training, "train_in_portable_process", must_not_train)
    assert prepare_model(trained_spec("diffusion"), workspace) == first
    assert not (first.directory(workspace) / "base").exists()


def test_a_failed_training_leaves_no_model_artifact(tmp_path, monkeypatch):
    import qrobust.tasks.models.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qrobust.tasks.models.training, "train_in_portable_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(trained_spec("ar"), Workspace.at(tmp_path))
    assert list((tmp_path / "artifacts" / "prepare-model").iterdir()) == []


def test_training_a_hub_model_is_refused_with_a_clear_error(tmp_path):
    spec = ModelSpec(name="hub-ar", family="ar", hf_id="Qwen/Qwen3-1.7B", training=SPEC)
    with pytest.raises(ConfigError, match="training applies only to tiny models"):
        prepare_model(spec, Workspace.at(tmp_path))
