"""A program that takes down the runner, the zygote or the whole sandbox costs only its
own verdict: the others in the call are re-run and judged."""

from __future__ import annotations

from qrobust.sandbox import Limits, Program, run_programs

NORMAL = "import time\ntime.sleep(0.05)\nassert sum(range(10)) == 45\n"
KILL_ZYGOTE = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
KILL_RUNNER = """
import os, signal
with open("/proc/%d/stat" % os.getppid()) as f:
    runner = int(f.read().rsplit(")", 1)[1].split()[1])
os.kill(runner, signal.SIGKILL)
"""
FREEZE_RUNNER = KILL_RUNNER.replace("SIGKILL", "SIGSTOP") + "import time\ntime.sleep(1)\n"


def shard_around(attack_source: str, timeout_s: float = 3.0) -> list[Program]:
    before = [Program(f"before {i}", NORMAL, 2.0) for i in range(3)]
    after = [Program(f"after {i}", NORMAL, 2.0) for i in range(3)]
    return [*before, Program("attack", attack_source, timeout_s), *after]


def statuses(verdicts) -> dict[str, str]:
    return {verdict.key: verdict.status for verdict in verdicts}


def test_killing_the_zygote_costs_only_the_attackers_verdict(any_backend):
    verdicts = run_programs(shard_around(KILL_ZYGOTE), backend=any_backend)
    assert statuses(verdicts) == {**{p.key: "passed" for p in shard_around("")}, "attack": "failed"}
    assert "died" in verdicts[3].error


def test_killing_the_runner_costs_only_the_attackers_verdict(any_backend):
    verdicts = run_programs(shard_around(KILL_RUNNER), backend=any_backend)
    assert statuses(verdicts) == {**{p.key: "passed" for p in shard_around("")}, "attack": "failed"}


def test_a_frozen_sandbox_is_ended_by_the_watchdog():
    # On the unisolated backend; qrobust.tools.hostile freezes docker and bwrap sandboxes too.
    limits = Limits(watchdog_slack_s=3.0)
    verdicts = run_programs(shard_around(FREEZE_RUNNER, timeout_s=1.0), backend="none", limits=limits)
    assert statuses(verdicts) == {**{p.key: "passed" for p in shard_around("")}, "attack": "timeout"}
    assert "watchdog" in verdicts[3].error
