"""The docker backend against the real engine: container settings, cleanup, image checks,
and the two scripts CI calls."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrobust.sandbox import Limits, Program, docker_backend, run_programs
from tests.sandbox.conftest import require_backend

REPOSITORY = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker


@pytest.fixture
def api():
    require_backend("docker")
    return docker_backend.api_client()


def test_containers_are_created_locked_down(api):
    limits = Limits(memory_mb=300, parallel=2, runner_memory_mb=100, pids=40, cpus=0.5, scratch_mb=16)
    container_id = docker_backend.DockerBackend()._create(api, limits, 60.0)
    try:
        inspected = api.inspect_container(container_id)
    finally:
        api.remove_container(container_id, force=True)
    host = inspected["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["AutoRemove"] is True
    assert host["Memory"] == host["MemorySwap"] == 700 << 20
    assert host["PidsLimit"] == 40
    assert host["NanoCpus"] == 500_000_000
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=16m,mode=1777"}
    assert host["LogConfig"]["Type"] == "none"
    assert inspected["Config"]["User"] == "65534:65534"
    assert inspected["Config"]["Labels"][docker_backend.LABEL] == "runner"


def test_no_container_outlives_a_call(api):
    run_programs([Program("p", "pass\n")], backend="docker")
    mine = [
        container
        for container in api.containers(all=True, filters={"label": docker_backend.LABEL})
        if container["Labels"].get(docker_backend.OWNER_LABEL) == docker_backend._owner()
    ]
    deadline = time.monotonic() + 10  # auto-removal completes just after the call returns
    while mine and time.monotonic() < deadline:
        time.sleep(0.1)
        mine = [c for c in mine if api.containers(all=True, filters={"id": c["Id"]})]
    assert mine == []


def test_stale_containers_are_reaped_and_live_ones_are_kept(api):
    def labelled(deadline: float, owner: str) -> str:
        labels = {
            docker_backend.LABEL: "runner",
            docker_backend.DEADLINE_LABEL: str(int(deadline)),
            docker_backend.OWNER_LABEL: owner,
        }
        return api.create_container(docker_backend.image_name(), labels=labels, network_disabled=True)["Id"]

    expired = labelled(time.time() - 3600, docker_backend._owner())
    orphaned = labelled(time.time() + 3600, f"{docker_backend.socket.gethostname()}:999999:1")
    live = labelled(time.time() + 3600, docker_backend._owner())
    try:
        docker_backend.reap_stale_containers(force=True)
        remaining = {c["Id"] for c in api.containers(all=True, filters={"label": docker_backend.LABEL})}
        assert expired not in remaining
        assert orphaned not in remaining
        assert live in remaining
    finally:
        for container_id in (expired, orphaned, live):
            try:
                api.remove_container(container_id, force=True)
            except Exception:
                pass


def test_an_image_with_another_runner_is_refused(api, monkeypatch):
    import docker

    client = docker.from_env(version="auto")
    dockerfile = f"FROM {docker_backend.image_name()}\nLABEL {docker_backend.RUNNER_SHA_LABEL}=an-older-runner\n"
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag="qrobust-sandbox-test:stale", rm=True)
    try:
        monkeypatch.setenv("QROBUST_SANDBOX_IMAGE", "qrobust-sandbox-test:stale")
        reason = docker_backend.unavailable_reason()
        assert reason == (
            "image qrobust-sandbox-test:stale holds an older sandbox/runner.py; "
            "rebuild it with: qrobust sandbox build"
        )
    finally:
        client.images.remove(image.id, force=True)


def test_the_image_holds_the_standard_library_and_the_runner_only(api):
    source = """
import sys, sysconfig, os
site = sysconfig.get_paths()["purelib"]
assert not os.path.isdir(site) or os.listdir(site) == [], os.listdir(site)
assert sorted(os.listdir("/opt/qrobust")) == ["runner.py"]
assert not os.path.exists("/work") and not os.path.exists("/qrobust")
"""
    [verdict] = run_programs([Program("image", source)], backend="docker")
    assert verdict.status == "passed", verdict.error


def test_the_build_command_is_a_quick_no_op_when_the_image_is_current(api):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qrobust", "sandbox", "build"], cwd=REPOSITORY, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout
    assert time.monotonic() - started < 10


def test_the_engine_command_is_a_no_op_when_an_engine_answers(api):
    result = subprocess.run(
        [sys.executable, "-m", "qrobust", "sandbox", "engine"], cwd=REPOSITORY, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "already reachable" in result.stdout
