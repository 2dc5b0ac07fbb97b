"""Nothing of a sandbox outlives a caller that is killed mid-call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrobust.sandbox import docker_backend
from tests.sandbox.conftest import require_backend

REPOSITORY = Path(__file__).resolve().parents[2]
CALLER = """
import sys
from qrobust.sandbox import Program, run_programs
run_programs([Program("sleeper", "import time\\ntime.sleep(60)\\n", 3.0)], backend=sys.argv[1])
"""


def descendants(root: int) -> set[int]:
    parents = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(name)] = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def start_caller(backend: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CALLER, backend], cwd=REPOSITORY)


@pytest.mark.bwrap
def test_a_killed_callers_bubblewrap_sandbox_dies_with_it():
    require_backend("bwrap")
    caller = start_caller("bwrap")
    try:
        assert wait_until(lambda: len(descendants(caller.pid)) >= 3, 20), "the sandbox never started"
        sandbox = descendants(caller.pid)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    assert wait_until(lambda: not any(alive(pid) for pid in sandbox), 5), [p for p in sandbox if alive(p)]


@pytest.mark.docker
def test_a_killed_callers_container_removes_itself():
    require_backend("docker")
    api = docker_backend.api_client()
    caller = start_caller("docker")

    def callers_containers():
        return [
            container
            for container in api.containers(all=True, filters={"label": docker_backend.LABEL})
            if f":{caller.pid}:" in container["Labels"].get(docker_backend.OWNER_LABEL, "")
        ]

    def running():
        return any(container["State"] == "running" for container in callers_containers())

    try:
        assert wait_until(running, 20), "the container never started"
        time.sleep(1)  # the request is on its way; a caller killed before that leaves a
        # created container, which the next call's reaping removes (test_docker_backend)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    # Its programs end at their time limit (3 s); then the container exits and is removed.
    assert wait_until(lambda: not callers_containers(), 15), callers_containers()
