"""bubblewrap specifics: the sandbox maps to an unprivileged host user, and gets
cgroup limits when the caller is root."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from qrobust.sandbox import Limits, Program, cgroups, run_programs
from qrobust.sandbox.bwrap_backend import RUNNER_INSIDE, cgroup_unavailable_reason
from tests.sandbox.conftest import require_backend

pytestmark = pytest.mark.bwrap


def sandbox_processes_on_the_host() -> dict[int, int]:
    """pid -> real uid of every interpreter running the runner inside bwrap."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            uid = int(Path(f"/proc/{name}/status").read_text().split("Uid:")[1].split()[0])
        except (OSError, IndexError):
            continue
        if argv[0].endswith(b"python3") and RUNNER_INSIDE.encode() in argv:
            found[int(name)] = uid
    return found


def test_the_sandbox_runs_as_an_unprivileged_host_user():
    require_backend("bwrap")
    seen: dict[int, int] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(sandbox_processes_on_the_host())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_programs([Program("slow", "import time\ntime.sleep(1)\n")], backend="bwrap")
    finally:
        done.set()
        watcher.join()
    assert seen, "never saw the sandboxed runner"
    assert set(seen.values()) == {65534 if os.geteuid() == 0 else os.geteuid()}


def require_cgroups() -> None:
    require_backend("bwrap")
    reason = cgroup_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no cgroups for bubblewrap here: {reason}")


def test_each_sandbox_gets_a_cgroup_with_the_docker_limits():
    require_cgroups()
    limits = Limits(memory_mb=100, parallel=2, runner_memory_mb=56, pids=17, cpus=0.5)
    group = cgroups.create(limits)
    try:
        values = {
            path.name: path.read_text().strip()
            for directory in group.directories
            for path in directory.iterdir()
            if path.name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max")
        }
    finally:
        group.remove()
    memory = values.get("memory.limit_in_bytes", values.get("memory.max"))
    assert int(memory) == 256 << 20
    assert values["pids.max"] == "17"
    assert values.get("cpu.cfs_quota_us", values.get("cpu.max", "").split(" ")[0]) == "50000"
    assert not any(directory.exists() for directory in group.directories)


def test_a_memory_bomb_spread_over_processes_is_stopped_by_the_sandbox_cgroup():
    require_cgroups()
    # Each process stays under its own address-space limit; together they would not.
    source = """
import os, time
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        block = bytearray(200 << 20)
        time.sleep(30)
        os._exit(0)
    children.append(pid)
time.sleep(1)
alive = 0
for pid in children:
    finished, status = os.waitpid(pid, os.WNOHANG)
    alive += finished == 0
assert alive == len(children), f"only {alive} of {len(children)} survived"
"""
    limits = Limits(memory_mb=256, parallel=1, runner_memory_mb=128)
    [verdict] = run_programs([Program("spread", source, 10.0)], backend="bwrap", limits=limits)
    assert verdict.status == "failed", verdict


def test_no_cgroup_is_left_behind():
    require_cgroups()
    run_programs([Program("p", "pass\n")], backend="bwrap")
    leftovers = [path for path in Path("/sys/fs/cgroup").rglob(cgroups.GROUP_NAME)]
    assert leftovers == []
