"""Shared fixtures: a Prefect home per test session, and tiny models built once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads these when first imported: a private home, offline-safe start-up.
_PREFECT_HOME = tempfile.mkdtemp(prefix="qrobust-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from qrobust.tasks.runtime.environment import set_library_environment  # noqa: E402

set_library_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]


def require_or_skip(available: bool, reason: str) -> None:
    """Skip when a capability is missing, unless CI demands it (then fail loudly)."""
    if available:
        return
    if os.environ.get("QROBUST_REQUIRE_SANDBOX") == "1":
        pytest.fail(f"required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_workspace(tmp_path_factory):
    from qrobust.tasks.runtime.workspace import Workspace

    return Workspace.at(tmp_path_factory.mktemp("shared-workspace"))


@pytest.fixture(scope="session")
def tiny_grid():
    from qrobust.tasks.grid_file import load_grid

    return load_grid("tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_grid, shared_workspace):
    """Base (untrained) checkpoints of tiny-ar and tiny-diffusion, by name.

    The grid trains its tiny models for minutes; stage tests need only the architecture, so
    the training is dropped here (tests/tasks/test_training.py covers training)."""
    import dataclasses

    from qrobust.tasks.stages.prepare_model import STAGE

    return {m.name: STAGE.run(shared_workspace, (dataclasses.replace(m, training=None),)) for m in tiny_grid.models}


@pytest.fixture(scope="session")
def stdlib_calibration(tiny_grid):
    """The tiny grid's calibration settings on the standard library's source: the stage
    tests use untrained tiny models, which have no training set to calibrate on."""
    import dataclasses

    return dataclasses.replace(tiny_grid.calibration, source="stdlib")
