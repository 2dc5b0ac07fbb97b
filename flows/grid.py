"""The grid flow: every cell of a model x method x benchmark grid, cached and resumable.

Composition only: which stage runs after which, what is cached, what is recorded. A
failing cell or shard is recorded in the store and the others go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tasks.config import Cell, GridConfig, MethodSpec, ModelSpec
from tasks.workspace import Workspace, artifact_exists


@dataclass
class PendingCell:
    cell: Cell
    checkpoint: dict
    generations: list[dict]
    futures: list
    started: float = field(default_factory=time.perf_counter)


def run_grid(grid: GridConfig, workspace: Workspace, console=None) -> dict:
    """Run (or resume) a grid; returns a summary {done, failed, seconds}."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(workspace.prefect_results)}):
        return grid_flow(grid, workspace, console)


def _flow(fn):
    from prefect import flow

    return flow(name="qrobust-grid", log_prints=False, validate_parameters=False)(fn)


@_flow
def grid_flow(grid: GridConfig, workspace: Workspace, console=None) -> dict:
    from tasks.store import connect, write_pairs
    from tasks.views import refresh_statistics

    progress = GridProgress(grid, console)
    started = time.perf_counter()
    with connect(workspace.store_path) as con:
        write_pairs(con, grid.pairs)
        pending: list[PendingCell] = []
        for model in grid.models:
            _run_model(grid, model, workspace, con, pending, progress)
        _drain(pending, con, workspace, grid, progress, wait=True)
        refresh_statistics(con)
    progress.close()
    return {**progress.counts, "seconds": time.perf_counter() - started}


def _stage(task, *args, refresh: bool = False):
    """Run a cached task; returns (result, state name: Completed | Cached)."""
    runner = task.with_options(refresh_cache=True) if refresh else task
    state = runner(*args, return_state=True)
    result = state.result()
    if isinstance(result, dict) and result.get("path") and not artifact_exists(result) and not refresh:
        return _stage(task, *args, refresh=True)  # the cached artifact was deleted: rebuild it
    return result, state.name


def _run_model(grid, model: ModelSpec, workspace, con, pending, progress) -> None:
    from tasks.stages import calibration_task, prepare_model_task
    from tasks.store import record_event

    cells = [c for c in grid.cells() if c.model == model]
    try:
        model_manifest, state = _stage(prepare_model_task, model, workspace)
        record_event(con, model.name, "prepare-model", state)
        needs_calibration = any(m.name in ("gptq", "hawq") for m in grid.methods)
        calibration = None
        if needs_calibration:
            calibration, state = _stage(calibration_task, grid.calibration, model_manifest, workspace)
            record_event(con, model.name, "calibration", state)
    except Exception as exc:
        for cell in cells:
            _record_failure(con, cell, f"model preparation failed: {_one_line(exc)}", grid, progress)
        return
    for method in grid.methods:
        method_cells = [c for c in cells if c.method == method]
        try:
            checkpoint = _quantized_checkpoint(model_manifest, method, calibration, workspace, con)
        except Exception as exc:
            for cell in method_cells:
                _record_failure(con, cell, f"quantization failed: {_one_line(exc)}", grid, progress)
            continue
        for cell in method_cells:
            _generate_cell(cell, checkpoint, grid, workspace, con, pending, progress)
            _drain(pending, con, workspace, grid, progress, wait=False)


def _quantized_checkpoint(model_manifest, method: MethodSpec, calibration, workspace, con) -> dict:
    from tasks.stages import quantize_task
    from tasks.store import record_event

    allocation = None
    if method.name == "hawq":
        allocation = _hawq_allocation(model_manifest, method, calibration, workspace, con)
    started = time.perf_counter()
    checkpoint, state = _stage(quantize_task, model_manifest, method, calibration, workspace, allocation)
    record_event(con, f"{model_manifest['name']}/{method.label}", "quantize", state, time.perf_counter() - started)
    return checkpoint


def _hawq_allocation(model_manifest, method, calibration, workspace, con) -> dict:
    from tasks.hawq import read_traces
    from tasks.stages import allocation_task, hessian_task
    from tasks.store import record_event, write_layer_sensitivity

    traces, state = _stage(hessian_task, model_manifest, method, calibration, workspace)
    record_event(con, f"{model_manifest['name']}/{method.label}", "hessian", state)
    write_layer_sensitivity(con, model_manifest["name"], method.estimator, read_traces(traces))
    allocation, state = _stage(allocation_task, model_manifest, method, traces, workspace)
    record_event(con, f"{model_manifest['name']}/{method.label}", "allocation", state)
    return allocation


def _generate_cell(cell: Cell, checkpoint, grid, workspace, con, pending, progress) -> None:
    from tasks.generate.shard import shard_task_ids
    from tasks.stages import execute_task, generate_task
    from tasks.store import record_event

    generations, futures = [], []
    try:
        for index, task_ids in enumerate(shard_task_ids(cell)):
            started = time.perf_counter()
            generation, state = _stage(generate_task, cell, checkpoint, task_ids, workspace)
            record_event(con, cell.cell_id, "generate", state, time.perf_counter() - started, shard=index)
            generations.append(generation)
            futures.append(execute_task.submit(cell, generation, grid.sandbox, workspace))
            progress.shard_done(cell)
    except Exception as exc:
        _record_failure(con, cell, f"generation failed: {_one_line(exc)}", grid, progress)
        return
    pending.append(PendingCell(cell, checkpoint, generations, futures))


def _drain(pending: list[PendingCell], con, workspace, grid, progress, wait: bool) -> None:
    from tasks.store import assemble_cell, record_event, write_cell

    for item in list(pending):
        if not wait and not all(f.state.is_final() for f in item.futures):
            continue
        pending.remove(item)
        try:
            verdicts = []
            for index, future in enumerate(item.futures):
                future.wait()
                verdicts.append(future.result())
                record_event(con, item.cell.cell_id, "execute", future.state.name, shard=index)
            samples, result = assemble_cell(item.checkpoint, item.generations, verdicts)
            backend = verdicts[0]["backend"] if verdicts else None
            record = _run_record(item.cell, grid, "done", sandbox=backend)
            record["module_bits"] = item.checkpoint.get("module_bits")
            write_cell(con, item.cell, record, samples, result)
            progress.cell_done(item.cell, result["pass_at_1"])
        except Exception as exc:
            _record_failure(con, item.cell, f"execution failed: {_one_line(exc)}", grid, progress)


def _run_record(cell: Cell, grid: GridConfig, status: str, error: str | None = None, sandbox: str | None = None):
    from dataclasses import asdict

    from tasks.benchmarks import benchmark_format, format_record

    config = {
        "cell": asdict(cell),
        "format": format_record(benchmark_format(cell.benchmark.name, cell.model.prompt_style)),
        "sandbox": asdict(grid.sandbox),
        "grid": grid.name,
    }
    return {"config": config, "status": status, "error": error, "sandbox": sandbox}


def _record_failure(con, cell: Cell, error: str, grid, progress) -> None:
    from tasks.store import record_event, write_cell

    write_cell(con, cell, _run_record(cell, grid, "failed", error=error), [], None)
    record_event(con, cell.cell_id, "cell", "Failed", error=error)
    progress.cell_failed(cell, error)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


class GridProgress:
    """A rich progress bar over the grid's cells, with a line per finished cell."""

    def __init__(self, grid: GridConfig, console=None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.counts = {"done": 0, "failed": 0}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("grid cells", total=len(grid.cells()))

    def shard_done(self, cell: Cell) -> None:
        self.progress.update(self.task, description=f"generating {cell.label}")

    def cell_done(self, cell: Cell, pass_at_1: float) -> None:
        self.counts["done"] += 1
        self.progress.advance(self.task)
        self.progress.console.log(f"{cell.label}: pass@1 {pass_at_1:.3f}")

    def cell_failed(self, cell: Cell, error: str) -> None:
        self.counts["failed"] += 1
        self.progress.advance(self.task)
        self.progress.console.log(f"[red]{cell.label}: FAILED[/red] {error}")

    def close(self) -> None:
        self.progress.update(self.task, description="grid cells")
        self.progress.stop()
