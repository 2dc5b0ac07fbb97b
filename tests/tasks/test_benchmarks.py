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
