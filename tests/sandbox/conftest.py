"""Backend fixtures for the sandbox tests.

A test of an isolating backend that cannot run here is skipped with the reason, or
FAILS when QROBUST_REQUIRE_SANDBOX=1 (as in CI), so that a broken sandbox set-up can
never pass as a green run.
"""

from __future__ import annotations

import os

import pytest

from qrobust.sandbox import SandboxUnavailable, resolve_backend

REQUIRE_ENV = "QROBUST_REQUIRE_SANDBOX"
ISOLATING = [pytest.param("docker", marks=pytest.mark.docker), pytest.param("bwrap", marks=pytest.mark.bwrap)]
EVERY = [*ISOLATING, pytest.param("none")]

# Filled by test_hostile.py, printed as a table at the end of the session.
HOSTILE_OUTCOMES: list = []


def require_backend(name: str) -> str:
    if name == "none":
        return name
    try:
        return resolve_backend(name)
    except SandboxUnavailable as exc:
        reason = str(exc)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=ISOLATING)
def isolating_backend(request) -> str:
    return require_backend(request.param)


@pytest.fixture(params=EVERY)
def any_backend(request) -> str:
    return require_backend(request.param)


def pytest_terminal_summary(terminalreporter) -> None:
    if HOSTILE_OUTCOMES:
        from qrobust.tools.hostile import format_table

        terminalreporter.section("hostile programs")
        for line in format_table(HOSTILE_OUTCOMES).splitlines():
            terminalreporter.write_line(line)
