"""Running the runner as a local process: the unisolated backend 'none', and the
plumbing (request in, events out, watchdog) that the bubblewrap backend shares."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from qrobust.sandbox.core import Limits
from qrobust.sandbox.shard import SandboxFailure, Termination, Watchdog

RUNNER_PATH = Path(__file__).parent / "runner.py"
STDERR_TAIL_BYTES = 4096


def stream_process(
    command: Sequence[str],
    request: bytes,
    watchdog: Watchdog,
    on_output: Callable[[bytes], None],
    *,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    user: int | None = None,
) -> Termination:
    """Run `command` with `request` on stdin, relay its stdout, kill it at the watchdog."""
    try:
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            env=env,
            cwd=cwd,
            start_new_session=True,
            **as_user(user),
        )
    except OSError as exc:
        raise SandboxFailure(f"cannot start {command[0]}: {exc}") from exc
    feeder = threading.Thread(target=_feed, args=(proc.stdin, request), daemon=True)
    feeder.start()
    stderr_tail = bytearray()
    watchdog_fired = _relay(proc, watchdog, on_output, stderr_tail)
    if watchdog_fired:
        _kill_group(proc.pid)
    proc.wait()
    feeder.join(timeout=5)
    description = watchdog.reason() if watchdog_fired else _describe(proc.returncode, bytes(stderr_tail))
    return Termination(description, watchdog_fired)


def as_user(uid: int | None) -> dict:
    """Popen arguments that start a process as `uid` (and its group), or as ourselves."""
    return {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}


def _feed(stdin, request: bytes) -> None:
    try:
        stdin.write(request)
        stdin.close()
    except OSError:
        pass  # the process died first; its exit says why


def _relay(proc, watchdog: Watchdog, on_output, stderr_tail: bytearray) -> bool:
    """Copy stdout to on_output and keep a stderr tail until both close; True if the watchdog fired."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, on_output)
        selector.register(proc.stderr, selectors.EVENT_READ, None)
        while selector.get_map():
            remaining = watchdog.remaining()
            if remaining <= 0:
                return True
            for key, _ in selector.select(remaining):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.data is not None:
                    key.data(data)
                else:
                    stderr_tail += data
                    del stderr_tail[:-STDERR_TAIL_BYTES]
    return False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _describe(returncode: int, stderr_tail: bytes) -> str:
    if returncode < 0:
        text = f"runner killed by {_signal_name(-returncode)}"
    else:
        text = f"runner exited with status {returncode}"
    last = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    return f"{text}: {last[-1][:200]}" if last else text


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class UnisolatedBackend:
    """'none': the runner as a plain subprocess. Per-program rlimits, sessions, a clean
    environment and death with the runner still apply, but programs see the host's
    files, network and processes, and what they start outlives them. Only for trusted
    programs, and only when asked for by name."""

    name = "none"
    private_pid_namespace = False  # on the host, killing 'stray' processes would hit others
    limits_processes = False  # RLIMIT_NPROC would count every process of the host user

    def execute(
        self, request: bytes, limits: Limits, watchdog: Watchdog, on_output: Callable[[bytes], None]
    ) -> Termination:
        scratch = tempfile.mkdtemp(prefix="qrobust-sandbox-")
        try:
            command = [sys.executable, "-I", "-S", str(RUNNER_PATH)]
            # The runner puts each program's scratch directory under TMPDIR.
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "TMPDIR": scratch}
            return stream_process(command, request, watchdog, on_output, env=env, cwd=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
