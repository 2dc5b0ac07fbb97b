import pytest

from qrobust.tasks.benchmarks import (
    benchmark_format,
    build_program,
    extract_code,
    load_problems,
    postprocess,
    render_prompt,
    truncate_at_stop_strings,
)
from qrobust.tasks.config import BenchmarkSpec

MBPP_SAMPLE = "data/benchmarks/mbpp_sample.jsonl"


def test_humaneval_ships_all_164_problems():
    assert len(load_problems(BenchmarkSpec("humaneval"))) == 164


def test_limit_and_task_ids_select_problems_in_order():
    chosen = load_problems(BenchmarkSpec("humaneval", task_ids=("HumanEval/7", "HumanEval/3")))
    assert [p.task_id for p in chosen] == ["HumanEval/7", "HumanEval/3"]
    assert len(load_problems(BenchmarkSpec("humaneval", limit=5))) == 5


def test_mbpp_loads_from_a_local_jsonl_in_the_hub_format():
    problems = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE))
    assert problems[0].task_id == "Mbpp/11"
    assert problems[0].entry_point == "sum_of_squares"
    assert "assert sum_of_squares([1, 2, 3]) == 14" in problems[0].test


def test_humaneval_completion_program_is_prompt_completion_tests_and_check():
    problem = load_problems(BenchmarkSpec("humaneval", limit=1))[0]
    fmt = benchmark_format("humaneval", "completion")
    program = build_program(problem, "    return True\n", fmt)
    assert program.startswith(problem.prompt + "    return True\n")
    assert program.rstrip().endswith(f"check({problem.entry_point})")


def test_stop_strings_cut_at_the_earliest_match():
    text = "    return x\n\ndef helper():\n    pass\n# trailing"
    assert truncate_at_stop_strings(text, ("\n#", "\ndef ")) == "    return x\n"


def test_mbpp_prompt_shows_the_description_and_first_test():
    problem = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, limit=1))[0]
    prompt = render_prompt(problem, benchmark_format("mbpp", "completion"))
    assert problem.description in prompt and "assert sum_of_squares([1, 2, 3]) == 14" in prompt


def test_chat_answers_are_reduced_to_their_first_code_block():
    answer = "Sure:\n```python\ndef f():\n    return 1\n```\nmore text"
    assert extract_code(answer) == "def f():\n    return 1\n"
    problem = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, limit=1))[0]
    assert postprocess(answer, benchmark_format("mbpp", "chat"), problem) == "def f():\n    return 1\n"


# --------------------------------------------------------------------------- HumanEval+ and MBPP+

from qrobust.tasks.benchmarks import (  # noqa: E402
    HUMANEVAL_PLUS_SAMPLE,
    MBPP_PLUS_SAMPLE,
    canonical_task_id,
    evalplus_test_without_numpy,
    render_generation_prefix,
)
from qrobust.tasks.config import ConfigError, PROMPT_STYLES  # noqa: E402


def test_humaneval_plus_loads_evalplus_rows_with_their_check_function_called():
    problems = load_problems(BenchmarkSpec("humaneval-plus", path=HUMANEVAL_PLUS_SAMPLE))
    assert [p.task_id for p in problems][:2] == ["HumanEval/0", "HumanEval/2"]
    first = problems[0]
    assert first.benchmark == "humaneval-plus" and first.entry_point == "has_close_elements"
    assert first.test.rstrip().endswith("check(has_close_elements)") and "numpy" not in first.test


def test_mbpp_plus_loads_evalplus_rows_with_their_prompt_base_asserts_and_larger_tests():
    problem = load_problems(BenchmarkSpec("mbpp-plus", path=MBPP_PLUS_SAMPLE, task_ids=(14,)))[0]
    assert problem.task_id == "Mbpp/14" and problem.entry_point == "largest"
    assert problem.description.startswith("Write a function that returns the largest element")
    assert len(problem.test_list) == 3 and problem.test_list[0] not in problem.test
    assert "candidate = largest\n" in problem.test  # its loop calls `candidate`


def test_plus_benchmarks_take_their_base_benchmarks_prompts_in_every_style():
    plus = load_problems(BenchmarkSpec("humaneval-plus", path=HUMANEVAL_PLUS_SAMPLE, limit=1))[0]
    base = load_problems(BenchmarkSpec("humaneval", task_ids=(plus.task_id,)))[0]
    for style in PROMPT_STYLES:
        plus_format, base_format = benchmark_format("humaneval-plus", style), benchmark_format("humaneval", style)
        assert plus_format.name == "humaneval-plus" and plus_format.cleanup == base_format.cleanup
        assert render_prompt(plus, plus_format) == render_prompt(base, base_format)
        assert render_generation_prefix(plus, plus_format) == render_generation_prefix(base, base_format)
        assert benchmark_format("mbpp-plus", style).stop_strings == benchmark_format("mbpp", style).stop_strings


def test_an_evalplus_test_keeps_everything_but_its_numpy_helpers_verbatim():
    test = ("import numpy as np\n\ndef is_floats(x):\n    return isinstance(x, np.ndarray)\n\n"
            "def assertion(out, exp, atol):\n    np.testing.assert_allclose(out, exp)\n\n"
            "def check(candidate):\n    inputs = [[1e-07], [2]]\n    assert candidate(2) == 4\n")
    rewritten = evalplus_test_without_numpy(test, "HumanEval/1")
    assert rewritten.endswith("def check(candidate):\n    inputs = [[1e-07], [2]]\n    assert candidate(2) == 4")
    assert "np." not in rewritten and rewritten.count("def assertion(") == 1


def test_an_evalplus_test_needing_numpy_elsewhere_is_refused_with_its_task_id():
    with pytest.raises(ConfigError, match="HumanEval/7 uses numpy"):
        evalplus_test_without_numpy("import numpy as np\ndef check(c):\n    assert c(np.zeros(2))\n", "HumanEval/7")


def test_task_ids_in_a_grid_may_be_mbpps_own_numbers():
    chosen = load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, task_ids=(12, "11", "Mbpp/13")))
    assert [p.task_id for p in chosen] == ["Mbpp/12", "Mbpp/11", "Mbpp/13"]


def test_a_humaneval_task_id_in_evalplus_directory_form_reads_as_the_problems_id():
    assert canonical_task_id("humaneval-plus", "HumanEval_163") == "HumanEval/163"


def test_an_unreachable_hub_benchmark_says_to_give_a_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"mbpp-plus could not be loaded from the hub \(evalplus/mbppplus"):
        load_problems(BenchmarkSpec("mbpp-plus"))
