"""End to end: the grid flow on tiny models, cached, extended and killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.storage.store import query
from qrobust.tasks.runtime.workspace import Workspace

pytestmark = pytest.mark.slow

GRID = """
name = "e2e"
[[models]]
name = "tiny-ar"
[[models]]
name = "tiny-diffusion"
[[pairs]]
diffusion = "tiny-diffusion"
ar = "tiny-ar"
[[methods]]
name = "fp"
[[methods]]
name = "gptq"
bits = [{bits}]
[[benchmarks]]
name = "humaneval"
limit = 2
[generation]
max_new_tokens = 12
steps = 6
shard_size = 1
[calibration]
n_samples = 8
seq_len = 32
"""

RESULT_COLUMNS = "model, method, bits, benchmark, n_problems, pass_at_1, avg_bits"
SAMPLE_COLUMNS = "model, method, bits, task_id, sample_idx, completion, status"


def _rows(workspace: Workspace, sql: str) -> list[tuple]:
    frame = query(workspace.store_path, sql).astype(object)
    frame = frame.where(frame.notna(), None)
    return [tuple(r) for r in frame.itertuples(index=False)]


def _results(workspace):
    return _rows(workspace, f"SELECT {RESULT_COLUMNS} FROM results ORDER BY ALL")


def _samples(workspace):
    return _rows(workspace, f"SELECT {SAMPLE_COLUMNS} FROM samples ORDER BY ALL")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from qrobust.flows.grid import run_grid

    workspace = Workspace.at(tmp_path_factory.mktemp("grid"))
    started = time.perf_counter()
    summary = run_grid(parse_grid(GRID.format(bits=4)), workspace)
    return workspace, summary, time.perf_counter() - started


def test_every_cell_of_the_grid_lands_in_the_store(first_run):
    workspace, summary, _ = first_run
    assert summary["done"] == 4 and summary["failed"] == 0
    assert len(_results(workspace)) == 4
    assert len(_samples(workspace)) == 4 * 2
    statuses = _rows(workspace, "SELECT DISTINCT status FROM runs")
    assert statuses == [("done",)]
    sandboxes = {r[0] for r in _rows(workspace, "SELECT DISTINCT sandbox FROM samples")}
    assert sandboxes <= {"docker", "bwrap"}


def test_rerunning_the_same_grid_recomputes_nothing(first_run):
    from qrobust.flows.grid import run_grid

    workspace, _, first_seconds = first_run
    before = _results(workspace), _samples(workspace)
    marker = query(workspace.store_path, "SELECT max(recorded_at) AS t FROM stage_events")["t"][0]
    run_grid(parse_grid(GRID.format(bits=4)), workspace)
    states = _rows(workspace, f"SELECT DISTINCT stage, state FROM stage_events WHERE recorded_at > '{marker}'")
    assert {state for _, state in states} == {"Cached"}, states
    assert (_results(workspace), _samples(workspace)) == before


def test_adding_a_bit_width_computes_only_the_new_cells(first_run):
    from qrobust.flows.grid import run_grid

    workspace, _, _ = first_run
    marker = query(workspace.store_path, "SELECT max(recorded_at) AS t FROM stage_events")["t"][0]
    grid = parse_grid(GRID.format(bits="4, 8"))
    run_grid(grid, workspace)
    computed = _rows(workspace, f"""
        SELECT DISTINCT stage, cell_id FROM stage_events
        WHERE recorded_at > '{marker}' AND state = 'Completed' AND stage IN ('quantize', 'generate')""")
    new_cells = {c.cell_id for c in grid.cells() if c.method.columns["bits"] == 8}
    generated = {cell for stage, cell in computed if stage == "generate"}
    quantized = {cell for stage, cell in computed if stage == "quantize"}
    assert generated == new_cells
    assert quantized == {"tiny-ar/gptq-w8g32", "tiny-diffusion/gptq-w8g32"}
    assert len(_results(workspace)) == 6


def test_a_run_killed_mid_way_resumes_to_identical_results(first_run, tmp_path):
    reference, _, _ = first_run
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID.format(bits=4))
    workspace = Workspace.at(tmp_path / "killed")
    command = [sys.executable, "-m", "qrobust.flows.cli", "run", str(grid_file), "--workspace", str(workspace.root),
               "--no-report"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    generations = workspace.root / "artifacts" / "generate"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if generations.exists() and len([p for p in generations.iterdir() if not p.name.startswith(".")]) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[2])
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected = [r for r in _results(reference) if r[2] in (None, 4)]
    assert _results(workspace) == expected
    expected_samples = [r for r in _samples(reference) if r[2] in (None, 4)]
    assert _samples(workspace) == expected_samples
    duplicates = _rows(workspace, "SELECT cell_id, task_id, sample_idx, count(*) FROM samples GROUP BY ALL HAVING count(*) > 1")
    assert duplicates == []


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    from qrobust.flows.grid import run_grid

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = parse_grid("""
[[models]]
name = "tiny-ar"
[[models]]
name = "unreachable"
hf_id = "no-such-org/no-such-model"
family = "ar"
[[methods]]
name = "fp"
[[benchmarks]]
name = "humaneval"
limit = 1
[generation]
max_new_tokens = 8
""")
    workspace = Workspace.at(tmp_path)
    summary = run_grid(grid, workspace)
    assert (summary["done"], summary["failed"]) == (1, 1)
    runs = dict(_rows(workspace, "SELECT model, status FROM runs"))
    assert runs == {"tiny-ar": "done", "unreachable": "failed"}
    error = _rows(workspace, "SELECT error FROM runs WHERE model = 'unreachable'")[0][0]
    assert error.startswith("generation failed:") and "\n" not in error
    assert len(_results(workspace)) == 1


def test_every_cell_says_in_which_environment_it_was_made_and_the_report_shows_it(first_run):
    import torch

    workspace, _, _ = first_run
    cells = _rows(workspace, "SELECT method, environment_id, quantize_environment_id FROM runs ORDER BY ALL")
    assert all(env for _, env, _ in cells)
    assert all((quantize_env is None) == (method == "fp") for method, _, quantize_env in cells)
    [environment] = _rows(workspace, "SELECT torch, gptqmodel, device, cpu_capability, threads, dtype FROM environments")
    assert environment[0] == torch.__version__ and environment[1] and environment[2]
    assert environment[3] == torch.backends.cpu.get_cpu_capability() and environment[4] >= 1
    assert environment[5] == "bfloat16"
    report = (workspace.report_dir / "report.md").read_text()
    assert "## environments" in report and cells[0][1] in report


def test_results_and_report_show_the_harness_and_each_cells_detectable_drop(first_run):
    workspace, _, _ = first_run
    assert _rows(workspace, "SELECT DISTINCT harness FROM results") == [("row-independent",)]
    drops = _rows(workspace, "SELECT model, min_detectable_drop FROM degradation ORDER BY model")
    assert {model for model, _ in drops} == {"tiny-ar", "tiny-diffusion"}
    assert all(drop is not None and 0 <= drop <= 2 for _, drop in drops)
    report = (workspace.report_dir / "report.md").read_text()
    assert "MDE (80%)" in report
