"""Host side of one sandbox run: the request, the runner's event stream, and recovery.

A backend starts one sandbox around sandbox/runner.py, feeds it a request, passes its
stdout here and reports how it ended. When a sandbox ends before every program has a
verdict (a program killed the runner, exhausted the container, or the watchdog fired),
the programs that were running are re-run one per sandbox and the ones that had not
started are re-run together, so a hostile program costs only its own verdict.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qrobust.sandbox.core import Limits, Program, Verdict

MAX_EVENT_LINE = 16_384
RUNNER_DEADLINE_MARGIN_S = 10.0  # the runner's own deadline is a backstop behind the host's


class SandboxFailure(RuntimeError):
    """The sandbox could not be started at all (engine error, missing binary)."""


@dataclass(frozen=True)
class Termination:
    """How a sandbox ended: a short description and whether the host's watchdog killed it."""

    description: str
    watchdog_fired: bool = False


class Watchdog:
    """When to give up on a sandbox: past its total budget, or silent for too long.

    The runner emits a heartbeat every second, so a sandbox whose runner was frozen or
    starved is noticed after `silence_s`, not after a budget that can run to hours.
    Only token-bearing lines count as signs of life, so programs cannot fake them.
    """

    def __init__(self, total_s: float, silence_s: float) -> None:
        self.total_s = total_s
        self.silence_s = silence_s
        self._started = self._last_sign = time.monotonic()

    def saw_life(self) -> None:
        self._last_sign = time.monotonic()

    def remaining(self) -> float:
        return min(self._started + self.total_s, self._last_sign + self.silence_s) - time.monotonic()

    def reason(self) -> str:
        now = time.monotonic()
        if now - self._started >= self.total_s:
            return f"watchdog: no result within {self.total_s:.0f}s"
        return f"watchdog: no sign of life for {self.silence_s:.0f}s"


class Backend(Protocol):
    name: str
    private_pid_namespace: bool  # lets the runner kill strays by session without harming the host
    limits_processes: bool  # whether RLIMIT_NPROC is a meaningful per-program limit here

    def execute(
        self, request: bytes, limits: Limits, watchdog: Watchdog, on_output: Callable[[bytes], None]
    ) -> Termination: ...


@dataclass
class EventStream:
    """Parses the runner's token-prefixed event lines; anything else is dropped."""

    token: str
    watchdog: Watchdog | None = None
    started: set[int] = field(default_factory=set)
    verdicts: dict[int, dict] = field(default_factory=dict)
    finished: bool = False
    on_verdict: Callable[[int, dict], None] | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _discarding: bool = False

    def feed(self, data: bytes) -> None:
        self._pending += data
        while True:
            newline = self._pending.find(b"\n")
            if newline < 0:
                if len(self._pending) > MAX_EVENT_LINE:  # no event is this long: garbage
                    self._pending.clear()
                    self._discarding = True
                return
            line = bytes(self._pending[:newline])
            del self._pending[: newline + 1]
            if not self._discarding:
                self._parse(line)
            self._discarding = False

    def _parse(self, line: bytes) -> None:
        prefix = self.token.encode() + b" "
        if not line.startswith(prefix):
            return
        try:
            event = json.loads(line[len(prefix) :])
        except ValueError:
            return
        if self.watchdog is not None:
            self.watchdog.saw_life()
        if "started" in event:
            self.started.add(int(event["started"]))
        elif "verdict" in event:
            index = int(event["verdict"])
            if index not in self.verdicts:
                self.verdicts[index] = event
                if self.on_verdict is not None:
                    self.on_verdict(index, event)
        elif "finished" in event:
            self.finished = True


def runner_request(
    programs: Sequence[Program], limits: Limits, backend: Backend, token: str, deadline_s: float
) -> bytes:
    rlimits = {
        "address_space_mb": limits.memory_mb,
        "file_size_mb": limits.scratch_mb,
        "open_files": limits.open_files,
        "processes": limits.pids if backend.limits_processes else 0,
    }
    request = {
        "token": token,
        "programs": [{"source": program.source, "timeout_s": program.timeout_s} for program in programs],
        "parallel": limits.parallel,
        "rlimits": rlimits,
        "output_bytes": limits.output_bytes,
        "private_pid_namespace": backend.private_pid_namespace,
        "deadline_s": deadline_s,
    }
    return json.dumps(request).encode("utf-8", "surrogatepass")


def verdict_from_event(program: Program, event: dict) -> Verdict:
    return Verdict(program.key, str(event["status"]), float(event.get("seconds", 0.0)), str(event.get("error", "")))


def judge(
    programs: Sequence[Program],
    backend: Backend,
    limits: Limits,
    progress: Callable[[int, int], None] | None = None,
) -> list[Verdict]:
    """Verdicts for all programs, in order, through as many sandboxes as recovery needs."""
    verdicts: dict[int, Verdict] = {}

    def record(index: int, verdict: Verdict) -> None:
        verdicts[index] = verdict
        if progress is not None:
            progress(len(verdicts), len(programs))

    groups = [list(range(len(programs)))] if programs else []
    while groups:
        group = groups.pop(0)
        groups.extend(_run_group(group, programs, backend, limits, record))
    return [verdicts[index] for index in range(len(programs))]


def _run_group(group, programs, backend, limits, record) -> list[list[int]]:
    """Runs one sandbox over `group`; returns the groups that must be run again."""
    members = [programs[index] for index in group]
    token = secrets.token_hex(16)
    watchdog = Watchdog(limits.watchdog_seconds([program.timeout_s for program in members]), limits.watchdog_slack_s)
    stream = EventStream(token, watchdog)
    stream.on_verdict = lambda local, event: record(group[local], verdict_from_event(programs[group[local]], event))
    request = runner_request(members, limits, backend, token, watchdog.total_s + RUNNER_DEADLINE_MARGIN_S)
    try:
        termination = backend.execute(request, limits, watchdog, stream.feed)
    except SandboxFailure as exc:
        termination = None
        failure = f"sandbox ({backend.name}) failed: {exc}"
    if termination is not None and stream.finished and len(stream.verdicts) == len(group):
        return []
    if termination is not None:
        failure = f"sandbox ({backend.name}) ended early: {termination.description}"
    unjudged = [local for local in range(len(group)) if local not in stream.verdicts]
    running = [local for local in unjudged if local in stream.started]
    waiting = [local for local in unjudged if local not in stream.started]
    if termination is None or (not running and len(waiting) == len(group)):
        # Nothing was judged or even started: the sandbox itself is at fault.
        for local in unjudged:
            record(group[local], Verdict(programs[group[local]].key, "error", 0.0, failure))
        return []
    if len(group) == 1:
        status = "timeout" if termination.watchdog_fired else "failed"
        record(group[0], Verdict(members[0].key, status, 0.0, f"{failure} while this program ran"))
        return []
    retry = [[group[local]] for local in running]
    if waiting:
        retry.append([group[local] for local in waiting])
    return retry
