"""Scaling out: the grid on a local Ray instance, a Ray worker killed mid-shard, two runs at once.

The Ray instance declares two GPUs that are not there (this machine has none); Ray schedules
them like real ones, so the test sees which stages reserved one and that shards spread over
both. The run started on the default runner by two processes at once is the reference the
Ray run must match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.runtime.workspace import Workspace
from tests.conftest import REPO_ROOT
from tests.flows.test_cli import _qrobust
from tests.flows.test_grid import GRID, _results, _rows, _samples

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install -e '.[ray]'")

GENERATION_WORKER_TITLE = b"ray::generate"


# --------------------------------------------------------------------------- choosing the runner

def test_an_unreachable_ray_address_is_a_one_line_error(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(bits=4))
    result = _qrobust("run", str(grid), "--workspace", str(tmp_path / "ws"), "--runner", "ray",
                      "--address", "127.0.0.1:1", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in lines[0], result.stderr


def test_a_machine_without_the_gpus_the_grid_asks_for_is_a_one_line_error(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(bits=4) + "[scale]\nquantize_gpus = 1\n")
    result = _qrobust("run", str(grid), "--workspace", str(tmp_path / "ws"), "--runner", "ray", timeout=300,
                      env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # Ray then finds no GPU here
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("qrobust: error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr  # Ray may warn before it
    assert "the Ray cluster has 0 GPUs but a quantize run asks for 1" in errors[0]


def test_an_address_without_the_ray_runner_is_a_one_line_error(tmp_path):
    result = _qrobust("run", "tiny", "--workspace", str(tmp_path / "ws"), "--address", "127.0.0.1:6379")
    assert result.returncode == 2 and result.stderr.strip() == "qrobust: error: --address needs --runner ray"


@pytest.mark.slow
def test_the_default_gpu_settings_run_on_a_ray_cluster_without_gpus(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(bits=4))
    result = _qrobust("run", str(grid), "--workspace", str(tmp_path / "ws"), "--runner", "ray", "--no-report",
                      timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    placements = _rows(Workspace.at(tmp_path / "ws"), "SELECT placement FROM stage_events WHERE stage = 'generate'")
    assert placements and all(json.loads(p)["gpu_ids"] == [] for p, in placements)


# --------------------------------------------------------------------------- two runs at once

@pytest.fixture(scope="module")
def two_runs_at_once(tmp_path_factory):
    """The same grid, started twice at once on the same workspace (default runner)."""
    root = tmp_path_factory.mktemp("two-runs")
    grid_file = root / "grid.toml"
    grid_file.write_text(GRID.format(bits=4))
    workspace = Workspace.at(root / "workspace")
    command = [sys.executable, "-m", "qrobust.flows.cli", "run", str(grid_file), "--workspace", str(workspace.root),
               "--no-report"]
    runs = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    return workspace, outcomes


@pytest.mark.slow
def test_two_runs_at_once_both_succeed_with_one_row_per_sample(two_runs_at_once):
    workspace, outcomes = two_runs_at_once
    for returncode, stderr in outcomes:
        assert returncode == 0, stderr[-2000:]
    assert len(_samples(workspace)) == 4 * 2
    assert _rows(workspace, "SELECT cell_id, task_id, sample_idx FROM samples GROUP BY ALL HAVING count(*) > 1") == []
    assert len(_results(workspace)) == 4
    assert _rows(workspace, "SELECT DISTINCT status FROM runs") == [("done",)]


@pytest.mark.slow
def test_two_runs_at_once_compute_each_stage_once(two_runs_at_once):
    workspace, _ = two_runs_at_once
    computed = _rows(workspace, """
        SELECT stage, cell_id, shard, count(*) FILTER (WHERE state = 'Completed') AS computed, count(*) AS runs
        FROM stage_events WHERE stage IN ('prepare-model', 'calibration', 'quantize', 'generate', 'execute')
        GROUP BY ALL ORDER BY ALL""")
    assert {stage for stage, *_ in computed} == {"prepare-model", "calibration", "quantize", "generate", "execute"}
    assert [row for row in computed if (row[3], row[4]) != (1, 2)] == []  # two runs of each, one computed


# --------------------------------------------------------------------------- the grid on Ray

def _descendants_titled(title: bytes) -> list[int]:
    """Processes started (through the local Ray instance) by this test process, by title."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(title):
                continue
            if _is_descendant(int(entry.name), os.getpid()):
                found.append(int(entry.name))
        except OSError:  # the process ended while being looked at
            continue
    return found


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name is the state, then ppid
        if pid == ancestor:
            return True
    return False


class WorkerKiller(threading.Thread):
    """Kills, with SIGKILL, the first Ray worker it sees generating a shard, once it has run a while."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _descendants_titled(GENERATION_WORKER_TITLE):
                time.sleep(0.5)  # well inside the shard: it loads the model, then generates
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # the shard ended first; wait for the next one
                    continue
                self.killed = pid
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """The grid on a local Ray instance with two declared GPUs, one generation worker killed."""
    from qrobust.flows.grid import run_grid
    from qrobust.flows.runners import RunnerSpec

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
    killer = WorkerKiller()
    try:
        workspace = Workspace.at(tmp_path_factory.mktemp("ray"))
        killer.start()
        summary = run_grid(parse_grid(GRID.format(bits=4)), workspace, RunnerSpec("ray"))
    finally:
        killer.stop.set()
        ray.shutdown()
    return workspace, summary, killer.killed


@pytest.mark.slow
def test_the_grid_on_ray_gives_the_default_runners_results(ray_run, two_runs_at_once):
    workspace, summary, _ = ray_run
    reference, _ = two_runs_at_once
    assert summary["done"] == 4 and summary["failed"] == 0
    assert _results(workspace) == _results(reference)
    assert _samples(workspace) == _samples(reference)


@pytest.mark.slow
def test_a_generation_worker_killed_mid_shard_costs_only_its_shard(ray_run):
    workspace, _, killed = ray_run
    assert killed is not None, "no generation worker was seen running"
    generations = _rows(workspace, """
        SELECT cell_id, shard, state, placement FROM stage_events WHERE stage = 'generate' ORDER BY ALL""")
    assert len(generations) == 4 * 2 and {state for _, _, state, _ in generations} == {"Completed"}
    assert killed not in {json.loads(placement)["pid"] for *_, placement in generations}
    assert _rows(workspace, "SELECT count(*) FROM stage_events WHERE state <> 'Completed'") == [(0,)]
    assert len(_samples(workspace)) == 4 * 2


def _placements(workspace, where: str) -> list[dict]:
    rows = _rows(workspace, f"SELECT placement FROM stage_events WHERE state = 'Completed' AND {where}")
    return [json.loads(placement) for placement, in rows]


@pytest.mark.slow
def test_generation_and_quantization_each_hold_one_of_the_gpus(ray_run):
    workspace, _, _ = ray_run
    generations = _placements(workspace, "stage = 'generate'")
    quantizations = _placements(workspace, "stage = 'quantize' AND cell_id LIKE '%/gptq-%'")
    assert len(generations) == 8 and len(quantizations) == 2
    for placement in generations + quantizations:
        assert placement["resources"]["GPU"] == 1.0 and len(placement["gpu_ids"]) == 1
    assert {p["gpu_ids"][0] for p in generations} == {"0", "1"}  # shards spread over both GPUs


@pytest.mark.slow
def test_stages_that_load_no_model_hold_no_gpu(ray_run):
    workspace, _, _ = ray_run
    cpu_only = _placements(workspace, "stage IN ('execute', 'prepare-model', 'calibration')")
    assert len(cpu_only) == 8 + 2 + 2
    assert all("GPU" not in p["resources"] and p["gpu_ids"] == [] for p in cpu_only)


@pytest.mark.slow
def test_the_timeline_shows_each_gpu_busy_for_part_of_the_run(ray_run):
    from qrobust.tools.ray_timeline import busy_fractions, stage_spans

    workspace, _, _ = ray_run
    spans = stage_spans(workspace.store_path)
    lanes = {gpu for span in spans for gpu in span["gpus"]}
    assert {"0", "1", "cpu"} <= lanes
    fractions = busy_fractions(spans)
    assert all(0 < fractions[gpu] <= 1 for gpu in ("0", "1"))
