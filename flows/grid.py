"""The grid flow: every cell of a model x method x benchmark grid, cached and resumable.

Composition only: which stage runs after which, what is cached, what is recorded. A
failing cell or shard is recorded in the store and the others go on. Where the stages run
(one process, or a Ray cluster) is `qrobust.flows.runners`' business; this module says what follows
each stage's result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qrobust.flows.runners import RunnerSpec, StageEvent, StageFailed, StageRunner, ray_session, result_storage
from qrobust.tasks.config import Cell, GridConfig, MethodSpec, ModelSpec
from qrobust.tasks.runtime.workspace import Workspace

if TYPE_CHECKING:
    from qrobust.tasks.storage.store import Store


def run_grid(grid: GridConfig, workspace: Workspace, runner: RunnerSpec = RunnerSpec()) -> dict:
    """Run (or resume) a grid; returns a summary {done, failed, seconds}."""
    flow = grid_flow.with_options(result_storage=result_storage(workspace), persist_result=False,
                                  task_runner=runner.task_runner())
    if runner.name == "threads":
        return flow(grid, workspace, runner)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with ray_session(runner, grid.scale, _gpu_stages(grid)) as api_url, \
            temporary_settings({PREFECT_API_URL: api_url}):
        return flow(grid, workspace, runner)


def _gpu_stages(grid: GridConfig) -> set[str]:
    """The stages of this grid that load a model (and so may hold a GPU)."""
    stages = {"generate"}
    if any(m.quantizes for m in grid.methods):
        stages.add("quantize")
    if any(m.name == "hawq" for m in grid.methods):
        stages.add("hessian")
    return stages


def _flow(fn):
    from prefect import flow

    return flow(name="qrobust-grid", log_prints=False, validate_parameters=False)(fn)


@dataclass
class GridRun:
    """What every step of the flow needs: the grid, where it lives, and how stages run."""

    grid: GridConfig
    workspace: Workspace
    store: "Store"
    stages: StageRunner
    progress: "GridProgress"


@dataclass
class CellRun:
    """A cell whose shards are in flight; its rows are written when every shard is judged."""

    cell: Cell
    checkpoint: dict
    n_shards: int
    generations: dict[int, dict] = field(default_factory=dict)
    verdicts: dict[int, dict] = field(default_factory=dict)
    failed: bool = False


@_flow
def grid_flow(grid: GridConfig, workspace: Workspace, runner: RunnerSpec = RunnerSpec()) -> dict:
    from qrobust.tasks.storage.store import Store, write_pairs
    from qrobust.tasks.storage.views import refresh_statistics

    started = time.perf_counter()
    store = Store(workspace.store_path)
    stages = StageRunner(runner, grid.scale, workspace.prefect_results / "locks", store)
    run = GridRun(grid, workspace, store, stages, GridProgress(grid))
    store.write(write_pairs, grid.pairs)
    for model in grid.models:
        _start_model(run, model)
    stages.finish()
    store.write(refresh_statistics)
    run.progress.close()
    return {**run.progress.counts, "seconds": time.perf_counter() - started}


def _start_model(run: GridRun, model: ModelSpec) -> None:
    from qrobust.tasks.runtime.stage_tasks import calibration_task, prepare_model_task

    cells = [c for c in run.grid.cells() if c.model == model]
    try:
        model_manifest = run.stages.run(prepare_model_task, model, run.workspace,
                                        event=StageEvent(model.name, "prepare-model"))
        calibration = None
        if any(m.name in ("gptq", "hawq") for m in run.grid.methods):
            calibration = run.stages.run(calibration_task, run.grid.calibration, model_manifest, run.workspace,
                                         event=StageEvent(model.name, "calibration"))
    except StageFailed as exc:
        for cell in cells:
            _record_failure(run, cell, f"model preparation failed: {exc}")
        return
    for method in run.grid.methods:
        _start_quantization(run, model_manifest, method, calibration, [c for c in cells if c.method == method])


def _start_quantization(run: GridRun, model_manifest: dict, method: MethodSpec, calibration, cells) -> None:
    """quantize (after hessian -> allocation for HAWQ), then every cell of this model x method."""
    from qrobust.tasks.stages.hessian import read_traces
    from qrobust.tasks.runtime.stage_tasks import allocation_task, hessian_task, quantize_task
    from qrobust.tasks.storage.store import write_layer_sensitivity

    subject = f"{model_manifest['name']}/{method.label}"

    def failed(error: str) -> None:
        for cell in cells:
            _record_failure(run, cell, f"quantization failed: {error}")

    def generate(checkpoint: dict) -> None:
        for cell in cells:
            _start_cell(run, cell, checkpoint)

    def quantize(allocation: dict | None) -> None:
        run.stages.submit(quantize_task, model_manifest, method, calibration, run.workspace, allocation,
                          event=StageEvent(subject, "quantize"), then=generate, on_error=failed,
                          uses_gpu=method.quantizes)

    def allocate(traces: dict) -> None:
        try:
            run.store.write(write_layer_sensitivity, model_manifest["name"], method.estimator, read_traces(traces))
        except Exception as exc:
            failed(_one_line(exc))
            return
        run.stages.submit(allocation_task, model_manifest, method, traces, run.workspace,
                          event=StageEvent(subject, "allocation"), then=quantize, on_error=failed)

    if method.name == "hawq":
        run.stages.submit(hessian_task, model_manifest, method, calibration, run.workspace,
                          event=StageEvent(subject, "hessian"), then=allocate, on_error=failed)
    else:
        quantize(None)


def _start_cell(run: GridRun, cell: Cell, checkpoint: dict) -> None:
    """generate every shard; judge each generated shard in the sandbox; store the judged cell."""
    from qrobust.tasks.stages.generate import shard_task_ids
    from qrobust.tasks.runtime.stage_tasks import execute_task, generate_task

    try:
        shards = shard_task_ids(cell)
    except Exception as exc:  # the benchmark's problems could not be loaded
        _record_failure(run, cell, f"generation failed: {_one_line(exc)}")
        return
    cell_run = CellRun(cell, checkpoint, n_shards=len(shards))

    def failed(stage: str):
        return lambda error: _fail_cell(run, cell_run, f"{stage} failed: {error}")

    def judge(index: int, generation: dict) -> None:
        cell_run.generations[index] = generation
        run.progress.shard_done(cell)
        if not cell_run.failed:
            run.stages.submit(execute_task, cell, generation, run.grid.sandbox, run.workspace,
                              event=StageEvent(cell.cell_id, "execute", index), on_error=failed("execution"),
                              then=lambda verdicts: _judged(run, cell_run, index, verdicts))

    if not shards:  # no problem selected: the cell is stored empty
        _store_cell(run, cell_run)
    for index, task_ids in enumerate(shards):
        if cell_run.failed:  # a shard failed already: the cell is recorded, the rest is moot
            break
        run.stages.submit(generate_task, cell, checkpoint, task_ids, run.workspace,
                          event=StageEvent(cell.cell_id, "generate", index), on_error=failed("generation"),
                          then=lambda generation, index=index: judge(index, generation))


def _judged(run: GridRun, cell_run: CellRun, index: int, verdicts: dict) -> None:
    cell_run.verdicts[index] = verdicts
    if not cell_run.failed and len(cell_run.verdicts) == cell_run.n_shards:
        _store_cell(run, cell_run)


def _store_cell(run: GridRun, cell_run: CellRun) -> None:
    from qrobust.tasks.storage.store import assemble_cell, write_cell

    cell = cell_run.cell
    try:
        order = range(cell_run.n_shards)
        verdicts = [cell_run.verdicts[i] for i in order]
        samples, result = assemble_cell(cell_run.checkpoint, [cell_run.generations[i] for i in order], verdicts)
        record = _run_record(cell, run.grid, "done", sandbox=verdicts[0]["backend"] if verdicts else None)
        record["module_bits"] = cell_run.checkpoint.get("module_bits")
        run.store.write(write_cell, cell, record, samples, result)
    except Exception as exc:
        _fail_cell(run, cell_run, f"execution failed: {_one_line(exc)}")
        return
    run.progress.cell_done(cell, result["pass_at_1"])


def _fail_cell(run: GridRun, cell_run: CellRun, error: str) -> None:
    if not cell_run.failed:  # the first failure is the cell's; its other shards' are consequences
        cell_run.failed = True
        _record_failure(run, cell_run.cell, error)


def _run_record(cell: Cell, grid: GridConfig, status: str, error: str | None = None, sandbox: str | None = None):
    from dataclasses import asdict

    from qrobust.tasks.benchmarks import benchmark_format, format_record

    config = {
        "cell": asdict(cell),
        "format": format_record(benchmark_format(cell.benchmark.name, cell.model.prompt_style)),
        "sandbox": asdict(grid.sandbox),
        "grid": grid.name,
    }
    return {"config": config, "status": status, "error": error, "sandbox": sandbox}


def _record_failure(run: GridRun, cell: Cell, error: str) -> None:
    from qrobust.tasks.storage.store import record_event, write_cell

    def write(con) -> None:
        write_cell(con, cell, _run_record(cell, run.grid, "failed", error=error), [], None)
        record_event(con, cell.cell_id, "cell", "Failed", error=error)

    run.store.write(write)
    run.progress.cell_failed(cell, error)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


class GridProgress:
    """A rich progress bar over the grid's cells, with a line per finished cell."""

    def __init__(self, grid: GridConfig) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
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
