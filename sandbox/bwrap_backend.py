"""The bubblewrap backend: sandbox/runner.py inside `bwrap`, one sandbox per shard.

The sandbox has its own user, PID, network (loopback only), IPC, UTS and cgroup
namespaces, no further user namespaces, a read-only root made only of the system's /usr
(no /home, /root, workspace or host /etc; only the dynamic loader's cache), a fresh
/proc and /dev, a size-capped tmpfs /tmp, a clean environment, the uid 65534 inside,
no capabilities and no-new-privileges, and it dies with its parent. When the host
process is root, bwrap itself is started as uid 65534 so that the sandbox maps to an
unprivileged host user rather than to root, and each sandbox gets a cgroup with the
same memory (swap included), pids and CPU limits as a docker container
(sandbox/cgroups.py). Every program also has its rlimits. Without root there is no
cgroup: `cpus` is not enforced, `parallel` bounds the CPU use, and memory is bounded
per process only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

from qrobust.sandbox import cgroups
from qrobust.sandbox.core import Limits
from qrobust.sandbox.local_backend import RUNNER_PATH, as_user, stream_process
from qrobust.sandbox.shard import SandboxFailure, Termination, Watchdog

SANDBOX_ID = 65534
RUNNER_INSIDE = "/opt/qrobust/runner.py"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")
PROBE_TIMEOUT_S = 20


def _dropping_root() -> bool:
    return os.geteuid() == 0


def _interpreter() -> str | None:
    """A python3 that the sandbox user can run from the bound system directories."""
    for candidate in INTERPRETERS:
        if os.access(candidate, os.X_OK):
            return candidate
    executable = os.path.realpath(sys.executable)
    return executable if not _dropping_root() else None


def _filesystem_arguments(interpreter: str) -> list[str]:
    arguments: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            arguments += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            arguments += ["--ro-bind", path, path]
    for path in LOADER_FILES:
        arguments += ["--ro-bind-try", path, path]
    prefix = os.path.realpath(sys.base_prefix)
    if not interpreter.startswith("/usr/") and interpreter.startswith(prefix + os.sep):
        arguments += ["--ro-bind", prefix, prefix]
    return arguments


def bwrap_command(interpreter: str, runner_fd: int, limits: Limits) -> list[str]:
    return [
        "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--uid", str(SANDBOX_ID),
        "--gid", str(SANDBOX_ID),
        "--hostname", "sandbox",
        "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
        *_filesystem_arguments(interpreter),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(limits.scratch_mb << 20),
        "--tmpfs", "/tmp",
        "--ro-bind-data", str(runner_fd), RUNNER_INSIDE,
        "--remount-ro", "/",
        "--chdir", "/tmp",
        interpreter, "-I", "-S", RUNNER_INSIDE,
    ]  # fmt: skip


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("runner", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when bwrap can build a sandbox here (checked once per process), else why not."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    interpreter = _interpreter()
    if interpreter is None:
        return "no system python3 for the sandbox user (looked for " + ", ".join(INTERPRETERS) + ")"
    runner_fd = _memfd_with(b"import json, resource, selectors, socket\n")
    try:
        with _launcher(Limits()) as (prefix, user):
            result = subprocess.run(
                [*prefix, *bwrap_command(interpreter, runner_fd, Limits())],
                pass_fds=(runner_fd,),
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
                **as_user(user),
            )
    except (OSError, subprocess.TimeoutExpired, SandboxFailure) as exc:
        return f"bubblewrap cannot start a sandbox here: {exc}"
    finally:
        os.close(runner_fd)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"bubblewrap cannot start a sandbox here: {detail[-1] if detail else f'exit status {result.returncode}'}"
    return None


@functools.lru_cache(maxsize=1)
def cgroup_unavailable_reason() -> str | None:
    """None when each sandbox can get its own memory/pids/CPU cgroup, else why not."""
    if not _dropping_root():
        return "not root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return cgroups.unavailable_reason()


def describe() -> str:
    reason = cgroup_unavailable_reason()
    return "bwrap with cgroup limits" if reason is None else f"bwrap with rlimits only ({reason})"


@contextlib.contextmanager
def _launcher(limits: Limits) -> Iterator[tuple[list[str], int | None]]:
    """(command prefix, uid to start it as) for one sandbox; its cgroup lives as long as this."""
    if cgroup_unavailable_reason() is not None:
        yield [], SANDBOX_ID if _dropping_root() else None
        return
    try:
        group = cgroups.create(limits)
    except OSError as exc:
        raise SandboxFailure(f"cannot create the sandbox's cgroups: {exc}") from exc
    try:
        # Root joins the cgroups, becomes the sandbox user, and only then starts bwrap.
        yield (
            [*group.join_prefix, "setpriv", f"--reuid={SANDBOX_ID}", f"--regid={SANDBOX_ID}", "--clear-groups", "--"],
            None,
        )
    finally:
        group.remove()


class BwrapBackend:
    name = "bwrap"
    private_pid_namespace = True
    limits_processes = True  # counted per user namespace: this sandbox's processes only

    def execute(
        self, request: bytes, limits: Limits, watchdog: Watchdog, on_output: Callable[[bytes], None]
    ) -> Termination:
        interpreter = _interpreter()
        if interpreter is None:
            raise SandboxFailure("no system python3 for the sandbox user")
        runner_fd = _memfd_with(RUNNER_PATH.read_bytes())
        try:
            with _launcher(limits) as (prefix, user):
                return stream_process(
                    [*prefix, *bwrap_command(interpreter, runner_fd, limits)],
                    request,
                    watchdog,
                    on_output,
                    pass_fds=(runner_fd,),
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    cwd="/",
                    user=user,
                )
        finally:
            os.close(runner_fd)
