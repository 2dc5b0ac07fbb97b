"""CoDA's HumanEval clean-up: each rule of its sanitizer and of the prediction it is given."""

import ast

from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.tasks.benchmarks import Problem, benchmark_format, postprocess
from qrobust.tasks.sanitize import MAX_LINES, longest_parsable_span, mentioned_names, sanitize

PROMPT = 'import math\n\n\ndef area(r: float) -> float:\n    """Area of a circle of radius r."""\n'
PROBLEM = Problem(benchmark="humaneval", task_id="HumanEval/900", prompt=PROMPT, entry_point="area",
                  test="def check(candidate):\n    assert candidate(1.0) == math.pi\n", reference="")
FORMAT = benchmark_format("humaneval", "coda-instruct")


def prediction(answer: str) -> str:
    return postprocess(answer, FORMAT, PROBLEM)


def body_of(program: str, name: str) -> str:
    node = next(n for n in ast.parse(program).body if getattr(n, "name", None) == name)
    return ast.unparse(node.body[-1])


# --------------------------------------------------------------------------- the prediction


def test_an_answer_that_continues_the_prompt_is_run_as_prompt_and_body():
    program = prediction("    return math.pi * r * r\n```\nThis squares r.")
    assert program.startswith("import math\ndef area(r: float) -> float:")
    assert body_of(program, "area") == "return math.pi * r * r"


def test_prose_before_a_python_fence_is_dropped_and_the_fenced_code_kept():
    program = prediction("Let me think about it.\n```python\n    return math.pi * r ** 2\n```\nDone.")
    assert body_of(program, "area") == "return math.pi * r ** 2"
    assert "think" not in program


def test_of_two_fences_the_first_python_fence_in_the_answer_gives_the_code():
    program = prediction("    return 0.0\n```\n\nOr better:\n```python\n    return math.pi * r * r\n```\n")
    assert body_of(program, "area") == "return math.pi * r * r"


def test_the_stop_strings_cut_the_answer_before_the_fence_is_looked_for():
    # "\ndef" is one of the harness's stop strings: a helper after the body never reaches the sanitizer
    program = prediction("    return _square(r) * math.pi\n\ndef _square(x):\n    return x * x\n")
    assert "_square(x)" not in program and body_of(program, "area") == "return _square(r) * math.pi"


def test_top_level_asserts_and_calls_are_dropped():
    program = prediction("    return math.pi * r * r\nassert area(1.0) > 3\nprint(area(2.0))\n")
    assert "assert" not in program and "print" not in program
    assert [type(n).__name__ for n in ast.parse(program).body] == ["Import", "FunctionDef"]


def test_a_syntax_error_halfway_keeps_the_longest_span_that_parses():
    answer = "    squared = r * r\n    return math.pi * squared\n  this line is not python (\n    return 0\n"
    program = prediction(answer)
    assert body_of(program, "area") == "return math.pi * squared"


def test_an_entry_point_without_a_return_is_dropped_with_everything_it_reached():
    program = prediction("    print(math.pi * r * r)\n")
    assert program == "import math"


# --------------------------------------------------------------------------- the sanitizer's rules


def test_helper_functions_the_entry_point_reaches_are_kept_and_unreachable_ones_dropped():
    code = (
        "def unused():\n    return 1\n\n"
        "def outer(x):\n    return inner(x) + LIMIT\n\n"
        "def inner(y):\n    return deeper(y)\n\n"
        "def deeper(z):\n    return z\n\n"
        "LIMIT = 3\n"
        "class Lonely:\n    pass\n"
    )
    kept = [n.name if hasattr(n, "name") else n.targets[0].id for n in ast.parse(sanitize(code, "outer")).body]
    assert kept == ["outer", "inner", "deeper", "LIMIT"]


def test_imports_are_always_kept_and_come_first():
    code = "def f(x):\n    return sqrt(x)\nimport os\nfrom math import sqrt\n"
    assert sanitize(code, "f").splitlines()[:2] == ["import os", "from math import sqrt"]


def test_attribute_reads_depend_on_the_attribute_name_and_nothing_inside_the_object_read():
    def names(source):
        return mentioned_names(ast.parse(source).body[0])

    assert names("def f(x):\n    return helpers.clean(x)\n") == {"clean", "x"}
    assert names("def f(x):\n    return helpers.clean(x).strip()\n") == {"strip"}


def test_a_redefinition_replaces_the_earlier_one_in_its_place():
    code = "def f():\n    return g()\ndef g():\n    return 1\ndef f():\n    return g() + 1\n"
    assert sanitize(code, "f") == "def f():\n    return g() + 1\ndef g():\n    return 1"


def test_without_an_entry_point_every_kept_definition_survives():
    assert sanitize("def a():\n    return 1\ndef b():\n    return 2\nb()\n", None) == (
        "def a():\n    return 1\ndef b():\n    return 2")


def test_tabs_and_carriage_returns_are_normalised_before_parsing():
    assert sanitize("def f():\r\n\treturn 1\r\n", "f") == "def f():\n    return 1"


def test_of_equally_long_parsable_spans_the_first_wins():
    text = "x = 1\n)\ny = 2\n"
    assert longest_parsable_span(text) == "x = 1"


def test_only_the_first_hundred_lines_are_searched():
    lines = [f"v{i} = {i}" for i in range(MAX_LINES + 20)]
    assert longest_parsable_span("\n".join(lines)).splitlines() == lines[:MAX_LINES]


def test_text_with_no_parsable_line_sanitizes_to_nothing():
    assert sanitize("this is ( not\n python at all", "f") == ""


LINES = st.sampled_from([
    "def f(x):", "    return x", "    return g(x)", "def g(y):", "    y += 1", "import os", "assert f(1)",
    "x = (", ")", "print(1)", "", "class C:", "    pass", "if x:", "prose, not code.", "\t  return 2",
])


@settings(max_examples=150, deadline=None)
@given(st.lists(LINES, max_size=14))
def test_a_sanitized_answer_always_parses_and_holds_only_imports_and_definitions(lines):
    result = sanitize("\n".join(lines), "f")
    kinds = {type(node) for node in ast.parse(result).body}
    assert kinds <= {ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign}
