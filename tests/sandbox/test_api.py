"""The public API: backend resolution, validation, order and progress."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qrobust.sandbox import (
    Limits,
    Program,
    SandboxUnavailable,
    Verdict,
    available_backends,
    bwrap_backend,
    resolve_backend,
    run_programs,
)

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def nothing_available(monkeypatch, tmp_path):
    """No sandbox image under that name, and no bwrap on PATH."""
    monkeypatch.setenv("QROBUST_SANDBOX_IMAGE", "qrobust-sandbox-absent:never-built")
    monkeypatch.setenv("PATH", str(tmp_path))
    bwrap_backend.unavailable_reason.cache_clear()
    yield
    bwrap_backend.unavailable_reason.cache_clear()


def test_an_unknown_backend_name_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError) as raised:
        resolve_backend("podman")
    assert str(raised.value) == "unknown sandbox backend 'podman'; allowed: auto, docker, bwrap, none"


def test_none_is_chosen_only_when_named():
    assert resolve_backend("none") == "none"
    try:
        assert resolve_backend("auto") in ("docker", "bwrap")
    except SandboxUnavailable:
        pass


def test_auto_prefers_docker_and_falls_back_to_bwrap():
    available = available_backends()
    if not available:
        pytest.skip("no isolating backend here")
    assert resolve_backend("auto") == available[0]
    assert available == [name for name in ("docker", "bwrap") if name in available]


@pytest.mark.usefixtures("nothing_available")
def test_without_any_backend_auto_raises_one_line_saying_why_and_what_to_do():
    with pytest.raises(SandboxUnavailable) as raised:
        resolve_backend("auto")
    message = str(raised.value)
    assert "\n" not in message
    assert (
        "docker: image qrobust-sandbox-absent:never-built is missing; build it with: qrobust sandbox build"
        in message
    )
    assert "bwrap: bubblewrap is not installed" in message
    assert available_backends() == []


@pytest.mark.usefixtures("nothing_available")
def test_run_programs_refuses_to_run_without_a_sandbox():
    with pytest.raises(SandboxUnavailable):
        run_programs([Program("p", "pass\n")])


def test_an_empty_call_needs_no_sandbox():
    assert run_programs([], backend="auto") == []


def test_verdicts_come_back_in_the_order_of_the_programs(any_backend):
    # Later programs finish first; keys must still line up.
    programs = [Program(f"p{i}", f"import time\ntime.sleep({0.05 * (5 - i)})\n", 10.0) for i in range(6)]
    verdicts = run_programs(programs, backend=any_backend, limits=Limits(parallel=3))
    assert [verdict.key for verdict in verdicts] == [program.key for program in programs]
    assert {verdict.status for verdict in verdicts} == {"passed"}


def test_progress_is_reported_after_every_verdict():
    calls = []
    run_programs(
        [Program(str(i), "pass\n") for i in range(5)],
        backend="none",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(done, 5) for done in range(1, 6)]


@pytest.mark.parametrize("field", ["memory_mb", "pids", "output_bytes", "scratch_mb", "parallel", "open_files"])
def test_limits_must_be_positive_integers(field):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})


def test_a_program_needs_a_positive_time_limit():
    with pytest.raises(ValueError, match="timeout_s"):
        Program("p", "pass\n", timeout_s=0)


def test_verdict_errors_are_short_and_statuses_known():
    assert len(Verdict("p", "failed", 0.0, "x" * 10_000).error) == 500
    with pytest.raises(ValueError, match="unknown verdict status"):
        Verdict("p", "crashed", 0.0, "")


def test_the_package_imports_no_docker_until_needed():
    code = "import sys, sandbox; sandbox.Limits(); print('docker' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPOSITORY)
    assert result.stdout.strip() == "False"
