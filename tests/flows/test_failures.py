"""Failures a person can read: the sandbox image disappears in the middle of a grid.

A failed cell is one line on the terminal (its traceback goes to the workspace's log), and a
change of sandbox backend in the middle of a grid is announced and recorded. The image is made
to disappear for real, by pointing the Docker backend at an image name that does not exist
once the first shard has been judged.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.runtime.workspace import Workspace
from tests.conftest import require_or_skip
from tests.flows.test_grid import GRID, _rows

pytestmark = pytest.mark.slow


class ImageVanisher(threading.Thread):
    """Points the Docker backend at a missing image as soon as one shard has been judged."""

    def __init__(self, workspace: Workspace) -> None:
        super().__init__(daemon=True)
        self.verdicts = workspace.root / "artifacts" / "execute"
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.verdicts.exists() and any(not p.name.startswith(".") for p in self.verdicts.iterdir()):
                os.environ["QROBUST_SANDBOX_IMAGE"] = "qrobust-sandbox-vanished:never-built"
                return
            time.sleep(0.02)


def _run_while_the_image_vanishes(tmp_path, monkeypatch, backend: str):
    from qrobust.flows.grid import run_grid
    from qrobust.sandbox import available_backends

    require_or_skip(available_backends() == ["docker", "bwrap"], "needs both the docker and the bwrap sandbox")
    monkeypatch.setenv("QROBUST_SANDBOX_IMAGE", os.environ.get("QROBUST_SANDBOX_IMAGE", "qrobust-sandbox:latest"))
    workspace = Workspace.at(tmp_path / "workspace")
    vanisher = ImageVanisher(workspace)
    vanisher.start()
    try:
        summary = run_grid(parse_grid(GRID.format(bits=4) + f'[sandbox]\nbackend = "{backend}"\n'), workspace,
                           report=False)
    finally:
        vanisher.stop.set()
    return workspace, summary


def test_cells_failing_in_the_sandbox_are_one_line_each_with_tracebacks_in_the_log(tmp_path, monkeypatch, capfd):
    workspace, summary = _run_while_the_image_vanishes(tmp_path, monkeypatch, "docker")
    out, err = capfd.readouterr()
    assert summary["failed"] >= 1 and summary["done"] + summary["failed"] == 4
    failures = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failures) == summary["failed"]
    assert "Traceback" not in out + err
    assert "Traceback" in (workspace.logs / "prefect.log").read_text()
    errors = _rows(workspace, "SELECT error FROM runs WHERE status = 'failed'")
    assert all(e.startswith("execution failed: SandboxUnavailable: sandbox backend 'docker' is unavailable: image "
                            "qrobust-sandbox-vanished:never-built is missing") for e, in errors)


def test_a_backend_change_in_the_middle_of_a_grid_is_announced_and_recorded(tmp_path, monkeypatch, capfd):
    workspace, summary = _run_while_the_image_vanishes(tmp_path, monkeypatch, "auto")
    _, err = capfd.readouterr()
    assert (summary["done"], summary["failed"]) == (4, 0)
    announced = [line for line in " ".join(err.split()).split("sandbox backend changed: ")[1:]]
    assert len(announced) == 1 and announced[0].startswith("docker -> bwrap (docker: image "
                                                           "qrobust-sandbox-vanished:never-built is missing")
    changes = _rows(workspace, "SELECT error FROM stage_events WHERE stage = 'sandbox' AND state = 'BackendChanged'")
    assert len(changes) == 1 and changes[0][0].startswith("docker -> bwrap")
    assert {backend for backend, in _rows(workspace, "SELECT DISTINCT sandbox FROM runs")} <= {"docker", "bwrap"}
