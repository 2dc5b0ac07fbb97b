"""The values the sandbox exchanges with its callers."""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "error")
ERROR_CHARS = 500


class SandboxUnavailable(RuntimeError):
    """No sandbox backend can run programs here; the message says why and what to do."""


@dataclass(frozen=True)
class Program:
    """A whole Python program (solution + tests + check call), judged as one unit."""

    key: str
    source: str
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"program {self.key!r}: timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class Verdict:
    """passed: ran to its last statement; failed: raised, exited early or was killed;
    timeout: exceeded its time limit; error: could not be judged (does not compile, or
    the sandbox failed)."""

    key: str
    status: str
    seconds: float
    error: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; allowed: {', '.join(STATUSES)}")
        if len(self.error) > ERROR_CHARS:
            object.__setattr__(self, "error", self.error[: ERROR_CHARS - 3] + "...")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one call to run_programs.

    memory_mb      address space of each program (RLIMIT_AS, every backend); the whole
                   sandbox (container, or bubblewrap's cgroup when root) gets
                   parallel * memory_mb + runner_memory_mb, swap included
    pids           processes (and threads) in the whole sandbox (pids cgroup); under
                   bubblewrap also per program (RLIMIT_NPROC, in its user namespace)
    cpus           CPU quota of the whole sandbox (docker; bubblewrap when root); the
                   unisolated backend ignores it
    output_bytes   stderr kept per program (stdout is discarded); caps what the host reads
    scratch_mb     size of the /tmp tmpfs (docker, bubblewrap) and largest file (RLIMIT_FSIZE)
    parallel       programs run at once inside one sandbox
    open_files     RLIMIT_NOFILE of each program
    runner_memory_mb  memory set aside for the runner and the container's init
    watchdog_slack_s  start-up allowance added to the whole-sandbox watchdog, and the
                   longest silence (no heartbeat) tolerated from a sandbox
    """

    memory_mb: int = 1024
    pids: int = 64
    cpus: float = 1.0
    output_bytes: int = 64_000
    scratch_mb: int = 64
    parallel: int = 2
    open_files: int = 256
    runner_memory_mb: int = 256
    watchdog_slack_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("memory_mb", "pids", "output_bytes", "scratch_mb", "parallel", "open_files", "runner_memory_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if not self.cpus > 0:
            raise ValueError(f"Limits.cpus must be positive, got {self.cpus!r}")
        if not self.watchdog_slack_s >= 0:
            raise ValueError(f"Limits.watchdog_slack_s must be >= 0, got {self.watchdog_slack_s!r}")

    def watchdog_seconds(self, timeouts: list[float]) -> float:
        """Wall-clock bound for one sandbox running programs with these time limits.

        List scheduling on `parallel` slots finishes within sum/parallel + max; each
        program also costs an interpreter start-up, allowed generously.
        """
        per_program_overhead_s = 0.5
        total = sum(timeouts) + per_program_overhead_s * len(timeouts)
        return self.watchdog_slack_s + total / self.parallel + max(timeouts, default=0.0)
