"""Isolated execution of untrusted Python programs, returning verdicts.

    from qrobust.sandbox import Program, run_programs, resolve_backend
    backend = resolve_backend("auto")          # "docker", else "bwrap", else SandboxUnavailable
    verdicts = run_programs([Program("HumanEval/0#0", source, timeout_s=10.0)], backend=backend)
    verdicts[0].status                         # "passed" | "failed" | "timeout" | "error"

One call runs all its programs in one sandbox (a container, or a bubblewrap sandbox),
`Limits.parallel` at a time, each in its own process with its own time limit; a
program passes only if it ran to its last statement (see sandbox/runner.py for how that
is established, and for the threat model). A program that kills or freezes the sandbox
costs only its own verdict: the others are re-run (sandbox/shard.py). Backends:

    docker  the default when an engine answers and the image is built
            (qrobust sandbox build: starts an engine if needed, builds the image offline)
    bwrap   bubblewrap, when there is no usable Docker engine
    none    no isolation at all: only when named explicitly, for trusted programs;
            callers must record that it was used

This package knows nothing of models, benchmarks or the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qrobust.sandbox.core import Limits, Program, SandboxUnavailable, Verdict

__all__ = [
    "BACKENDS",
    "Limits",
    "Program",
    "SandboxUnavailable",
    "Verdict",
    "available_backends",
    "unavailable_reason",
    "resolve_backend",
    "run_programs",
]

BACKENDS = ("docker", "bwrap")
ALLOWED_NAMES = ("auto", *BACKENDS, "none")


def unavailable_reason(name: str) -> str | None:
    """Why isolating backend `name` cannot run here now; None when it can."""
    if name == "docker":
        from qrobust.sandbox import docker_backend

        return docker_backend.unavailable_reason()
    from qrobust.sandbox import bwrap_backend

    return bwrap_backend.unavailable_reason()


def available_backends() -> list[str]:
    """The isolating backends usable right now, in order of preference."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def resolve_backend(name: str = "auto") -> str:
    """The backend a call with `name` would use; raises SandboxUnavailable if it cannot run.

    "auto" picks docker when its engine answers and its image is current, else bwrap.
    "none" (no isolation) is returned only when asked for by name.
    """
    if name not in ALLOWED_NAMES:
        raise ValueError(f"unknown sandbox backend {name!r}; allowed: {', '.join(ALLOWED_NAMES)}")
    if name == "none":
        return name
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise SandboxUnavailable(f"sandbox backend '{name}' is unavailable: {reason}")
        return name
    reasons = []
    for candidate in BACKENDS:
        reason = unavailable_reason(candidate)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    advice = " (backend 'none' runs programs without isolation, if you must)"
    raise SandboxUnavailable(f"no sandbox backend available: {'; '.join(reasons)}{advice}")


def _backend(name: str):
    if name == "docker":
        from qrobust.sandbox.docker_backend import DockerBackend

        return DockerBackend()
    if name == "bwrap":
        from qrobust.sandbox.bwrap_backend import BwrapBackend

        return BwrapBackend()
    from qrobust.sandbox.local_backend import UnisolatedBackend

    return UnisolatedBackend()


def run_programs(
    programs: Sequence[Program],
    backend: str = "auto",
    limits: Limits = Limits(),
    progress: Callable[[int, int], None] | None = None,
) -> list[Verdict]:
    """Judge `programs` in one sandbox; verdicts come back in the same order.

    A program that crashes, hangs, or attacks the sandbox gets failed/timeout/error and
    never costs the others their verdicts. `progress(done, total)` is called after each
    verdict. Raises SandboxUnavailable when the backend cannot run here.
    """
    from qrobust.sandbox.shard import judge

    programs = list(programs)
    if not programs:
        return []
    return judge(programs, _backend(resolve_backend(backend)), limits, progress)
