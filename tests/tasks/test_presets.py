"""The study's presets: per-model generation settings, CoDA's instruct prompts, the paper grids."""

import pytest

from qrobust.tasks.benchmarks import (
    benchmark_format,
    build_program,
    load_problems,
    postprocess,
    render_generation_prefix,
    render_prompt,
)
from qrobust.tasks.config import BenchmarkSpec, ConfigError
from qrobust.tasks.grid_file import load_grid, parse_grid

TWO_MODELS = """
[[models]]
name = "tiny-ar"
{ar_generation}
[[models]]
name = "tiny-diffusion"
[[methods]]
name = "fp"
[[benchmarks]]
name = "humaneval"
limit = 2
[generation]
max_new_tokens = 24
batch_size = 3
"""
MBPP_SAMPLE = "data/benchmarks/mbpp_sample.jsonl"


def _grid(ar_generation: str = ""):
    return parse_grid(TWO_MODELS.format(ar_generation=ar_generation))


def _cell(grid, model: str):
    return next(c for c in grid.cells() if c.model.name == model)


# --------------------------------------------------------------------------- per-model generation

def test_a_models_generation_table_overrides_the_grids_and_inherits_the_rest():
    grid = _grid('[models.generation]\ntemperature = 0.5\nn_samples = 2')
    generation = _cell(grid, "tiny-ar").generation
    assert (generation.temperature, generation.n_samples) == (0.5, 2)
    assert (generation.max_new_tokens, generation.batch_size) == (24, 3)


def test_a_model_without_a_generation_table_uses_the_grids():
    grid = _grid('[models.generation]\ntemperature = 0.5')
    assert _cell(grid, "tiny-diffusion").generation == grid.generation


def test_changing_one_models_generation_changes_only_that_models_cells():
    before, after = _grid(), _grid('[models.generation]\nmax_new_tokens = 32')
    assert _cell(before, "tiny-ar").cell_id != _cell(after, "tiny-ar").cell_id
    assert _cell(before, "tiny-diffusion").cell_id == _cell(after, "tiny-diffusion").cell_id


@pytest.mark.parametrize(
    "table, fragment",
    [
        ('[models.generation]\nstepz = 3', "unknown key 'stepz' in model 'tiny-ar' generation; allowed: "),
        ('[models.generation]\ntemperature = -1', "temperature must be a positive number, got -1"),
        ('[models.generation]\nweights = "fast"', "unknown weights mode 'fast'; allowed: kernel, dequantized"),
        ('generation = 3', "generation of model 'tiny-ar' must be a table, got 3"),
    ],
)
def test_a_bad_model_generation_table_gives_one_line_naming_the_value(table, fragment):
    with pytest.raises(ConfigError) as error:
        _grid(table)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_training_must_match_the_models_own_generation_length():
    table = 'training = { max_new_tokens = 24 }\n[models.generation]\nmax_new_tokens = 32'
    with pytest.raises(ConfigError, match="training.max_new_tokens 24 differs from its generation max_new_tokens 32"):
        _grid(table)


def test_the_same_model_twice_is_refused():
    with pytest.raises(ConfigError, match="duplicate model 'tiny-ar' in grid"):
        parse_grid(TWO_MODELS.format(ar_generation="").replace('"tiny-diffusion"', '"tiny-ar"'))


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ('architecture = "mamba"', "unknown architecture 'mamba'; allowed: auto, coda, dream, llada"),
        ('architecture = "coda"', "architecture 'coda', which needs family 'diffusion', not 'ar'"),
        ('prompt_style = "fancy"', "unknown prompt style 'fancy'; allowed: completion, chat, coda-instruct"),
    ],
)
def test_a_bad_model_setting_names_the_value_and_the_allowed_ones(entry, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _grid(entry)


# --------------------------------------------------------------------------- CoDA's instruct formats

def test_humaneval_instruct_asks_for_the_function_and_starts_the_answer_inside_it():
    problem = load_problems(BenchmarkSpec("humaneval", limit=1))[0]
    fmt = benchmark_format("humaneval", "coda-instruct")
    assert render_prompt(problem, fmt) == (
        "Write a solution to the following problem and make sure that it passes the tests:\n```" + problem.prompt
    )
    prefix = render_generation_prefix(problem, fmt)
    assert prefix == "Here is the completed function:\n```python\n" + problem.prompt + "\n"


def test_humaneval_instruct_answer_is_cut_at_the_stop_strings_and_run_as_the_sanitized_prompt_and_body():
    problem = load_problems(BenchmarkSpec("humaneval", limit=1))[0]
    fmt = benchmark_format("humaneval", "coda-instruct")
    answer = "    return True\n```\n\nExplanation:\nif you want\ndef other(): pass"
    completion = postprocess(answer, fmt, problem)
    assert completion.startswith("from typing import List\ndef has_close_elements(")
    assert completion.endswith('"""\n    return True') and "def other" not in completion
    assert build_program(problem, completion, fmt).startswith(completion + "\n\n" + problem.test)


def test_mbpp_instruct_shows_every_test_and_the_answer_is_the_code_before_the_fence():
    problem = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, limit=1))[0]
    fmt = benchmark_format("mbpp", "coda-instruct")
    prompt = render_prompt(problem, fmt)
    assert prompt.startswith(f"You are an expert Python programmer, and here is your task: {problem.description} ")
    assert prompt.endswith("Your code should pass these tests:\n\n" + "\n".join(problem.test_list))
    assert render_generation_prefix(problem, fmt) == "Here is the completed function:\n```python\n"
    assert postprocess("def f():\n    return 1\n```\nDone.", fmt, problem) == "def f():\n    return 1\n"


def test_model_input_is_the_chat_template_then_the_generation_prefix():
    from qrobust.tasks.stages.generate import prompts_for
    from qrobust.tasks.models.tiny import build_tokenizer

    grid = parse_grid('[[models]]\nname = "tiny-ar"\nprompt_style = "coda-instruct"\n'
                      '[[methods]]\nname = "fp"\n[[benchmarks]]\nname = "humaneval"\nlimit = 1\n')
    cell = grid.cells()[0]
    problem = load_problems(cell.benchmark)[0]
    fmt = benchmark_format("humaneval", "coda-instruct")
    [text] = prompts_for([problem], fmt, build_tokenizer(1024))
    chat = f"<|im_start|>user\n{render_prompt(problem, fmt)}<|im_end|>\n<|im_start|>assistant\n"
    assert text == chat + render_generation_prefix(problem, fmt)


def test_every_coda_format_cites_codas_own_task_files():
    for benchmark in ("humaneval", "mbpp", "humaneval-plus", "mbpp-plus"):
        source = benchmark_format(benchmark, "coda-instruct").source
        assert source.startswith("CoDA evaluation/lm_eval/lm_eval/tasks/") and "Dream" not in source


# --------------------------------------------------------------------------- the bundled study grids

def test_paper_grid_is_both_real_models_by_every_method_on_the_four_full_benchmarks():
    grid = load_grid("paper")
    assert [m.name for m in grid.models] == ["coda-1.7b", "qwen3-1.7b"]
    assert [m.label for m in grid.methods] == [
        "fp", "gptq-w2g128", "gptq-w3g128", "gptq-w4g128", "gptq-w8g128", "hawq-2.5", "hawq-3", "hawq-3.5", "hawq-4",
    ]
    assert [(b.name, b.path, b.limit) for b in grid.benchmarks] == [
        ("humaneval", None, None), ("mbpp", None, None), ("humaneval-plus", None, None), ("mbpp-plus", None, None)]
    assert [(p.diffusion, p.ar) for p in grid.pairs] == [("coda-1.7b", "qwen3-1.7b")]
    assert len(grid.cells()) == 2 * 9 * 4


def test_paper_grid_samples_coda_as_published_and_qwen3_as_its_model_card_suggests_ten_times():
    grid = load_grid("paper")
    for cell in grid.cells():
        g, model = cell.generation, cell.model
        settings = (model.prompt_style, model.dtype, g.max_new_tokens, g.n_samples)
        assert settings == ("coda-instruct", "bfloat16", 768, 10)
        assert (g.harness, g.batch_size, g.shard_size) == ("row-independent", 32, 32)
        if model.name == "coda-1.7b":
            assert model.architecture == "coda" and model.mask_token_id == 151669
            assert (g.steps, g.temperature, g.top_p, g.alg) == (768, 0.1, 0.9, "entropy")
        else:
            assert (g.temperature, g.top_p, g.top_k) == (0.7, 0.8, 20)


def test_paper_grids_sample_count_detects_a_five_point_drop_on_humaneval_at_codas_published_score():
    import numpy as np

    from qrobust.tasks.numerics.stats import minimum_detectable_drop

    n = load_grid("paper").generation_for(load_grid("paper").models[0]).n_samples
    solved = np.array([1] * 89 + [0] * 75)  # 164 problems at CoDA's published 54.3%, one sample each
    assert minimum_detectable_drop(np.ones(164), solved, np.ones(164)) / np.sqrt(n) <= 0.05
    assert minimum_detectable_drop(np.ones(164), solved, np.ones(164)) / np.sqrt(n - 1) > 0.05


def test_the_paper_grid_uncommented_reproduces_codas_published_harness():
    from qrobust.tasks.runtime.bundled import data_path

    commented = data_path("grids/paper.toml").read_text()
    text = commented.replace('# harness = "coda-published"', 'harness = "coda-published"')
    grid = parse_grid(text)
    coda, qwen3 = grid.models
    assert grid.generation_for(coda).harness == "coda-published" and grid.sandbox_for(coda).timeout_s == 3.0
    assert grid.generation_for(qwen3).harness == "row-independent"


def test_the_wikitext2_grid_is_the_studys_clean_gptq_calibration_of_both_models():
    paper, study = load_grid("paper"), load_grid("paper-wikitext2")
    assert (study.calibration.source, study.calibration.mask_ratios, study.calibration.path) == ("wikitext2", (), None)
    assert [m.label for m in study.methods] == ["fp", "gptq-w2g128", "gptq-w3g128", "gptq-w4g128", "gptq-w8g128"]
    assert [m.name for m in study.models] == [m.name for m in paper.models]
    assert [b.name for b in study.benchmarks] == [b.name for b in paper.benchmarks]
    for model in study.models:
        assert study.generation_for(model) == paper.generation_for(model)


def test_dry_run_settings_show_each_cells_own_sampler():
    from qrobust.flows.cli import generation_settings

    grid = load_grid("paper")
    coda = generation_settings(_cell(grid, "coda-1.7b")).split()
    qwen3 = generation_settings(_cell(grid, "qwen3-1.7b")).split()
    assert {"max_new_tokens=768", "steps=768", "temperature=0.1", "top_p=0.9", "alg=entropy"} <= set(coda)
    assert {"max_new_tokens=768", "temperature=0.7", "top_k=20"} <= set(qwen3)
    assert not any(s.startswith("steps=") for s in qwen3)


def test_paper_tiny_grid_keeps_the_presets_on_tiny_stand_ins():
    paper, tiny = load_grid("paper"), load_grid("paper-tiny")
    assert [m.name for m in tiny.methods][:1] == ["fp"]
    assert {m.name for m in tiny.methods} == {m.name for m in paper.methods}
    assert [m.budget for m in tiny.methods if m.name == "hawq"] == [m.budget for m in paper.methods if m.name == "hawq"]
    assert [m.bits for m in tiny.methods if m.name == "gptq"] == [m.bits for m in paper.methods if m.name == "gptq"]
    diffusion, ar = tiny.models
    assert (diffusion.architecture, diffusion.tiny is not None, ar.family) == ("coda", True, "ar")
    assert {m.prompt_style for m in tiny.models} == {"coda-instruct"}
    coda = tiny.generation_for(diffusion)
    assert (coda.temperature, coda.top_p, coda.alg, coda.steps) == (0.1, 0.9, "entropy", coda.max_new_tokens)
    assert tiny.generation_for(ar).temperature == 0.0


# --------------------------------------------------------------------------- the backbone-matched pairs

PAIRS = [("dream-7b", "qwen2.5-7b"), ("dream-coder-7b", "qwen2.5-coder-7b"), ("diffucoder-7b", "qwen2.5-coder-7b"),
         ("llada-8b", "llama3-8b")]


def _generation(grid, model: str, benchmark: str):
    return next(c.generation for c in grid.cells() if c.model.name == model and c.benchmark.name == benchmark)


def test_pairs_grid_declares_every_diffusion_coder_beside_its_twin():
    grid = load_grid("pairs")
    assert [(p.diffusion, p.ar) for p in grid.pairs] == PAIRS
    assert {m.name: m.architecture for m in grid.models if m.family == "diffusion"} == {
        "dream-7b": "dream", "dream-coder-7b": "dream", "diffucoder-7b": "dream", "llada-8b": "llada"}
    assert {m.prompt_style for m in grid.models} == {"coda-instruct"}


def test_a_preset_model_runs_with_its_authors_settings_per_benchmark():
    grid = load_grid("pairs")
    humaneval, mbpp = _generation(grid, "dream-7b", "humaneval"), _generation(grid, "dream-7b", "mbpp")
    assert (humaneval.max_new_tokens, humaneval.steps, mbpp.max_new_tokens, mbpp.steps) == (768, 768, 1024, 1024)
    assert (humaneval.temperature, humaneval.top_p, humaneval.alg) == (0.1, 0.9, "entropy")
    llada_humaneval, llada_mbpp = _generation(grid, "llada-8b", "humaneval"), _generation(grid, "llada-8b", "mbpp")
    assert (llada_humaneval.block_length, llada_humaneval.suppressed_tokens) == (512, ("<|endoftext|>",))
    assert (llada_mbpp.block_length, llada_mbpp.confidence_excluded_tokens) == (256, ("<|endoftext|>", "<|eot_id|>"))
    assert (llada_mbpp.temperature, llada_mbpp.alg) == (0.0, "maskgit_plus")


def test_every_preset_names_where_its_settings_come_from():
    from qrobust.tasks.presets import BUILTIN_MODELS, MODEL_CARDS

    real = {name for name, spec in BUILTIN_MODELS.items() if spec.hf_id is not None}
    assert set(MODEL_CARDS) == real
    assert all(card.evaluation_source for card in MODEL_CARDS.values())


def test_an_ar_twin_takes_its_partners_answer_length_from_the_grid_and_decodes_greedily():
    grid = load_grid("pairs")
    for benchmark, length in (("humaneval", 768), ("mbpp", 1024)):
        twin = _generation(grid, "qwen2.5-7b", benchmark)
        assert (twin.max_new_tokens, twin.temperature) == (length, 0.0)


def test_a_grids_model_table_overrides_the_preset_and_its_benchmark_table_overrides_both():
    text = ('[[models]]\nname = "dream-7b"\n[models.generation]\nmax_new_tokens = 64\n'
            '[models.generation.mbpp]\nsteps = 8\n[[methods]]\nname = "fp"\n'
            '[[benchmarks]]\nname = "humaneval"\n[[benchmarks]]\nname = "mbpp"\npath = "' + MBPP_SAMPLE + '"\n')
    grid = parse_grid(text)
    humaneval, mbpp = _generation(grid, "dream-7b", "humaneval"), _generation(grid, "dream-7b", "mbpp")
    assert (humaneval.max_new_tokens, humaneval.steps, humaneval.temperature) == (64, 768, 0.1)
    assert (mbpp.max_new_tokens, mbpp.steps) == (64, 8)


def test_a_generation_table_for_an_unknown_benchmark_is_refused():
    with pytest.raises(ConfigError, match="unknown benchmark table 'apps' in model 'tiny-ar' generation; allowed: humaneval, mbpp"):
        _grid('[models.generation.apps]\nsteps = 3')


def test_a_bad_token_list_is_refused_naming_the_value():
    with pytest.raises(ConfigError, match="generation suppressed_tokens must be a list of token texts, got \\(3,\\)"):
        _grid('[models.generation]\nsuppressed_tokens = [3]')


def test_pairs_tiny_grid_keeps_the_new_presets_on_tiny_stand_ins():
    tiny = load_grid("pairs-tiny")
    assert {m.name: m.architecture for m in tiny.models} == {"tiny-dream": "dream", "tiny-llada": "llada", "tiny-twin": "auto"}
    llada = {b: _generation(tiny, "tiny-llada", b) for b in ("humaneval", "mbpp")}
    assert llada["humaneval"].suppressed_tokens == ("<|endoftext|>",) and not llada["humaneval"].confidence_excluded_tokens
    assert llada["mbpp"].confidence_excluded_tokens == ("<|endoftext|>", "<|eot_id|>")


def test_dry_run_settings_show_lladas_eos_settings_per_benchmark():
    from qrobust.flows.cli import generation_settings

    grid = load_grid("pairs")
    cells = {c.benchmark.name: c for c in grid.cells() if c.model.name == "llada-8b" and c.method.name == "fp"}
    assert "suppressed_tokens=<|endoftext|>" in generation_settings(cells["humaneval"]).split()
    assert "confidence_excluded_tokens=<|endoftext|>,<|eot_id|>" in generation_settings(cells["mbpp"]).split()
    assert "block_length=256" in generation_settings(cells["mbpp"]).split()
