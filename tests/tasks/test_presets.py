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


def test_humaneval_instruct_answer_is_cut_at_each_stop_string_and_continues_the_prompt():
    problem = load_problems(BenchmarkSpec("humaneval", limit=1))[0]
    fmt = benchmark_format("humaneval", "coda-instruct")
    answer = "    return True\n```\n\nExplanation:\nif you want\ndef other(): pass"
    completion = postprocess(answer, fmt)
    assert completion == "    return True\n"
    assert build_program(problem, completion, fmt).startswith(problem.prompt + "    return True\n")


def test_mbpp_instruct_shows_every_test_and_the_answer_is_the_code_before_the_fence():
    problem = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, limit=1))[0]
    fmt = benchmark_format("mbpp", "coda-instruct")
    prompt = render_prompt(problem, fmt)
    assert prompt.startswith(f"You are an expert Python programmer, and here is your task: {problem.description} ")
    assert prompt.endswith("Your code should pass these tests:\n\n" + "\n".join(problem.test_list))
    assert render_generation_prefix(problem, fmt) == "Here is the completed function:\n```python\n"
    assert postprocess("def f():\n    return 1\n```\nDone.", fmt) == "def f():\n    return 1\n"


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


def test_every_format_records_where_it_comes_from():
    for benchmark in ("humaneval", "mbpp"):
        assert "lm-evaluation-harness" in benchmark_format(benchmark, "coda-instruct").source


# --------------------------------------------------------------------------- the bundled study grids

def test_paper_grid_is_both_real_models_by_every_method_on_both_full_benchmarks():
    grid = load_grid("paper")
    assert [m.name for m in grid.models] == ["coda-1.7b", "qwen3-1.7b"]
    assert [m.label for m in grid.methods] == [
        "fp", "gptq-w2g128", "gptq-w3g128", "gptq-w4g128", "gptq-w8g128", "hawq-2.5", "hawq-3", "hawq-3.5", "hawq-4",
    ]
    assert [(b.name, b.path, b.limit) for b in grid.benchmarks] == [("humaneval", None, None), ("mbpp", None, None)]
    assert [(p.diffusion, p.ar) for p in grid.pairs] == [("coda-1.7b", "qwen3-1.7b")]
    assert len(grid.cells()) == 2 * 9 * 2


def test_paper_grid_runs_coda_with_its_published_sampler_and_qwen3_greedy():
    grid = load_grid("paper")
    for cell in grid.cells():
        g, model = cell.generation, cell.model
        assert (model.prompt_style, model.dtype, g.max_new_tokens, g.n_samples) == ("coda-instruct", "bfloat16", 768, 1)
        if model.name == "coda-1.7b":
            assert model.architecture == "coda" and model.mask_token_id == 151669
            assert (g.steps, g.temperature, g.top_p, g.alg) == (768, 0.1, 0.9, "entropy")
        else:
            assert g.temperature == 0.0


def test_dry_run_settings_show_each_cells_own_sampler():
    from qrobust.flows.cli import generation_settings

    grid = load_grid("paper")
    coda = generation_settings(_cell(grid, "coda-1.7b")).split()
    qwen3 = generation_settings(_cell(grid, "qwen3-1.7b")).split()
    assert {"max_new_tokens=768", "steps=768", "temperature=0.1", "top_p=0.9", "alg=entropy"} <= set(coda)
    assert {"max_new_tokens=768", "temperature=0.0"} <= set(qwen3)
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
