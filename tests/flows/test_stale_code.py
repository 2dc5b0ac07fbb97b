"""The cache follows the code: editing one stage's source recomputes that stage and what depends
on it, and nothing else. Run on a copy of the package, edited for real, in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import REPO_ROOT
from tests.flows.test_grid import GRID

pytestmark = pytest.mark.slow

PACKAGE_FOLDERS = ("flows", "tasks", "sandbox", "tools", "data", "docker")


def _installed_copy(destination: Path) -> Path:
    """The package as a wheel lays it out (qrobust/flows, qrobust/tasks, ...), copied from the checkout."""
    package = destination / "qrobust"
    shutil.copytree(REPO_ROOT / "qrobust", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def _edit(site: Path, module: str, marker: str) -> None:
    path = site / "qrobust" / module
    path.write_text(path.read_text() + f"\n\n_EDITED_FOR_A_TEST = {marker!r}\n")


class Run:
    def __init__(self, tmp_path: Path) -> None:
        self.site = _installed_copy(tmp_path / "site")
        self.grid = tmp_path / "grid.toml"
        self.grid.write_text(GRID.format(bits=4))
        self.workspace = tmp_path / "workspace"
        self.runs = 0

    def qrobust(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(self.site)}
        finished = subprocess.run([sys.executable, "-m", "qrobust", *args], cwd=self.site, env=env,
                                  capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr[-3000:]
        return finished

    def __call__(self) -> dict[str, dict[str, int]]:
        """Run the grid from the copy; returns {state: {stage: runs}} of what this run recorded."""
        store = self.workspace / "results.duckdb"
        before = "1970-01-01"
        if store.exists():
            with duckdb.connect(str(store), read_only=True) as con:
                before = con.execute("SELECT max(recorded_at) FROM stage_events").fetchone()[0]
        self.qrobust("run", str(self.grid), "--workspace", str(self.workspace))
        with duckdb.connect(str(store), read_only=True) as con:
            rows = con.execute("""
                SELECT stage, state, count(*) FROM stage_events
                WHERE recorded_at > ? AND stage NOT IN ('cell', 'sandbox') GROUP BY ALL""", [before]).fetchall()
        states: dict[str, dict[str, int]] = {}
        for stage, state, count in rows:
            states.setdefault(state, {})[stage] = count
        return states


def test_edits_recompute_exactly_the_stages_that_run_the_edited_code(tmp_path):
    run = Run(tmp_path)
    first = run()
    assert set(first) == {"Completed"}, first
    assert run() == {"Cached": first["Completed"]}, "an unchanged rerun must compute nothing"

    _edit(run.site, "tasks/stages/quantize.py", "quantizer")
    after_quantizer = run()
    # the GPTQ cells' checkpoints, their shards and the report; the fp cells and preparation stay
    assert after_quantizer["Completed"] == {"quantize": 2, "generate": 4, "execute": 4, "report": 1}
    assert after_quantizer["Cached"] == {"prepare-model": 2, "calibration": 2, "generate": 4, "execute": 4}

    _edit(run.site, "tasks/decoding/diffusion.py", "sampler")
    after_sampler = run()
    # the diffusion model's shards (fp and GPTQ), judged again; no quantization, no AR shard
    assert after_sampler["Completed"] == {"generate": 4, "execute": 4, "report": 1}
    assert after_sampler["Cached"] == {"prepare-model": 2, "calibration": 2, "quantize": 2, "generate": 4,
                                       "execute": 4}

    _edit(run.site, "tasks/storage/report.py", "report")
    after_report = run()
    assert after_report["Completed"] == {"report": 1}


def test_status_names_the_stage_and_module_that_made_a_cell_stale(tmp_path):
    run = Run(tmp_path)
    run()
    _edit(run.site, "tasks/decoding/diffusion.py", "sampler")
    status = run.qrobust("status", str(run.grid), "--workspace", str(run.workspace))
    assert "2 of 4 stored cells are stale" in " ".join(status.stdout.split())
    script = (
        "import json, sys; from qrobust.flows.grid import cell_freshness, plan_grid; "
        "from qrobust.tasks.grid_file import load_grid; "
        "plans = plan_grid(load_grid(sys.argv[1])); "
        "print(json.dumps({p.cell.label: v for p, v in zip(plans, map(cell_freshness(plans, sys.argv[2]).get, "
        "[p.cell.cell_id for p in plans]))}))"
    )
    env = {**os.environ, "PYTHONPATH": str(run.site)}
    printed = subprocess.run([sys.executable, "-c", script, str(run.grid), str(run.workspace / "results.duckdb")],
                             cwd=run.site, env=env, capture_output=True, text=True, timeout=300, check=True)
    freshness = json.loads(printed.stdout.strip().splitlines()[-1])
    assert freshness["tiny-ar/fp/humaneval"] == "current"
    assert freshness["tiny-ar/gptq-w4g32/humaneval"] == "current"
    for label in ("tiny-diffusion/fp/humaneval", "tiny-diffusion/gptq-w4g32/humaneval"):
        assert freshness[label] == "stale: generate code changed (qrobust.tasks.decoding.diffusion)"
