"""Every attack in qrobust.tools.hostile, against every isolating backend."""

from __future__ import annotations

import pytest

from qrobust.sandbox import Program, run_programs
from qrobust.tools.hostile import ATTACKS, STEAL_PASS_MESSAGE_FROM_STACK, Bait, run_attack
from tests.sandbox.conftest import HOSTILE_OUTCOMES

# attack -> whether it leaves a trace on the host when it works
ESCAPES_THAT_WORK_WITHOUT_ISOLATION = {
    "connect to the host's loopback listener": True,
    "write outside the scratch directory": True,
    "kill host processes": True,
    "read the workspace database": False,
    "read host files": False,
    "read the environment secret": False,
}


@pytest.fixture
def bait():
    with Bait() as fresh:
        yield fresh


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_attack_is_contained(isolating_backend, attack, bait):
    outcome = run_attack(attack, isolating_backend, bait)
    HOSTILE_OUTCOMES.append(outcome)
    assert outcome.contained, outcome.explain()


@pytest.mark.parametrize("name", ESCAPES_THAT_WORK_WITHOUT_ISOLATION)
def test_escape_attack_succeeds_without_isolation(name, bait):
    # The control: were these programs broken, their failure in a sandbox would prove nothing.
    attack = next(attack for attack in ATTACKS if attack.name == name)
    outcome = run_attack(attack, "none", bait)
    assert outcome.verdict.status == "passed", outcome.verdict.error
    assert bool(outcome.damage) == ESCAPES_THAT_WORK_WITHOUT_ISOLATION[name], outcome.damage


def test_forging_its_own_pass_in_process_is_the_documented_limit(any_backend):
    # The "steal the pass message" attack fails only because a child sends it; the same
    # code in the program's own process succeeds, as sandbox/runner.py's docstring states.
    # This keeps the fork variant honest: its stealing code does find the message.
    steal_in_process = (
        "import os, sys\n" + STEAL_PASS_MESSAGE_FROM_STACK + "os._exit(0)\nraise AssertionError('the tests would fail')\n"
    )
    [verdict] = run_programs([Program("forger", steal_in_process, 5.0)], backend=any_backend)
    assert verdict.status == "passed"
