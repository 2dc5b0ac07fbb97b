"""The grid flow: every cell of a model x method x benchmark grid, cached and resumable.

Composition only. `plan_grid` says which stage runs on what: for each cell, its model's
preparation, the stages its method needs (the method says: calibration, HAWQ's hessian and
allocation, quantization), one generation and one sandboxed execution per shard. Identical
stage runs (one model preparation for every cell of a model, one quantization for every
benchmark) are one call. Every call's cache key is known before anything runs.

`grid_flow` submits every call as a Prefect task whose arguments are its upstream futures, so
Prefect orders them, records the edges and carries a failure downstream; the task runner
(threads, or Ray) decides where they run. As calls finish the flow records them, and stores
each cell when its last shard is judged; a failing cell is recorded with one line and the
others go on. Only this process writes the store.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qrobust.flows.runners import RunnerSpec, Submitter, prefect_logs_to, ray_session
from qrobust.tasks.config import Cell, ConfigError, GridConfig
from qrobust.tasks.runtime.stage import ArtifactRef, Stage
from qrobust.tasks.runtime.workspace import Workspace

if TYPE_CHECKING:
    from qrobust.tasks.storage.store import Store

# What a cell's error says failed, by the stage that failed first.
FAILED_PART = {
    "prepare-model": "model preparation",
    "calibration": "model preparation",
    "hessian": "quantization",
    "allocation": "quantization",
    "quantize": "quantization",
    "generate": "generation",
    "execute": "execution",
}
STAGE_ORDER = tuple(FAILED_PART)


@functools.lru_cache(maxsize=1)
def stages() -> dict[str, Stage]:
    """Every pipeline stage, by name, in pipeline order."""
    from qrobust.tasks.stages import allocation, calibration, execute, generate, hessian, prepare_model, quantize

    modules = (prepare_model, calibration, hessian, allocation, quantize, generate, execute)
    return {module.STAGE.name: module.STAGE for module in modules}


def downstream_of(names: set[str]) -> frozenset[str]:
    """`names` and every stage after the first of them (what a forced recomputation invalidates)."""
    unknown = sorted(set(names) - set(STAGE_ORDER) - {"report"})
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; allowed: {', '.join((*STAGE_ORDER, 'report'))}")
    firsts = [STAGE_ORDER.index(name) for name in names if name in STAGE_ORDER]
    after = set(STAGE_ORDER[min(firsts):]) if firsts else set()
    return frozenset(after | set(names))


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True, eq=False)
class StageCall:
    """One stage run: its inputs are values or the calls whose artifacts they are."""

    stage: Stage
    inputs: tuple
    subject: str  # what stage_events calls it: a model, a model/method, or a cell id
    shard: int | None = None

    @functools.cached_property
    def key(self) -> str:
        return self.stage.key(self.planned_inputs)

    @property
    def planned_inputs(self) -> tuple:
        return tuple(ArtifactRef(v.stage.name, v.key) if isinstance(v, StageCall) else v for v in self.inputs)

    @property
    def upstream(self) -> list["StageCall"]:
        return [v for v in self.inputs if isinstance(v, StageCall)]


@dataclass
class CellPlan:
    cell: Cell
    calls: list[StageCall] = field(default_factory=list)  # every call the cell needs, in stage order
    checkpoint: StageCall | None = None
    shards: list[tuple[StageCall, StageCall]] = field(default_factory=list)  # (generate, execute)
    error: str | None = None  # the cell could not be planned (its problems did not load)


def selected_cells(grid: GridConfig, only: tuple[str, ...] = ()) -> list:
    """The grid's cells whose label (model/method/benchmark) is, or else contains, one of `only`;
    all if `only` is empty."""
    cells = grid.cells()
    if not only:
        return cells
    exact = {c.label for c in cells} & set(only)
    chosen = [c for c in cells if c.label in exact or any(t in c.label for t in only if t not in exact)]
    if not chosen:
        raise ConfigError(f"no cell of grid {grid.name!r} matches {', '.join(map(repr, only))}; its cells look like "
                          + ", ".join(c.label for c in cells[:4]) + (" ..." if len(cells) > 4 else ""))
    return chosen


def plan_grid(grid: GridConfig, only: tuple[str, ...] = ()) -> list[CellPlan]:
    """The stage calls of every cell (of those `only` selects); calls with the same stage and key
    are one call."""
    from qrobust.tasks.benchmarks import problem_shards

    known: dict[tuple[str, str], StageCall] = {}
    s = stages()

    def call(stage: str, inputs: tuple, subject: str, shard: int | None = None) -> StageCall:
        new = StageCall(s[stage], inputs, subject, shard)
        return known.setdefault((stage, new.key), new)

    plans = []
    for cell in selected_cells(grid, only):
        model, method = cell.model, cell.method
        plan = CellPlan(cell)
        prepared = call("prepare-model", (model,), model.name)
        plan.calls.append(prepared)
        checkpoint = prepared
        if method.quantizes:
            subject = f"{model.name}/{method.label}"
            calibration = allocation = None
            if method.needs_calibration:
                calibration = call("calibration", (cell.calibration, prepared), model.name)
                plan.calls.append(calibration)
            if method.needs_curvature:
                traces = call("hessian", (prepared, method.curvature, calibration),
                              f"{model.name}/{method.curvature.estimator}")
                allocation = call("allocation", (prepared, method, traces), subject)
                plan.calls += [traces, allocation]
            checkpoint = call("quantize", (prepared, method, calibration, allocation), subject)
            plan.calls.append(checkpoint)
        plan.checkpoint = checkpoint
        try:
            shards = problem_shards(cell.benchmark, cell.generation.shard_size)
        except Exception as exc:  # the benchmark's problems could not be loaded
            plan.error = f"generation failed: {_one_line(exc)}"
            shards = []
        for index, shard in enumerate(shards):
            generate = call("generate", (shard, model.prompt_style, cell.generation, model.family, checkpoint),
                            cell.cell_id, index)
            execute = call("execute", (shard, model.prompt_style, generate, grid.sandbox_for(model),
                                       cell.generation.harness), cell.cell_id, index)
            plan.shards.append((generate, execute))
            plan.calls += [generate, execute]
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------- running it

def run_grid(grid: GridConfig, workspace: Workspace, runner: RunnerSpec = RunnerSpec(),
             recompute: frozenset[str] = frozenset(), report: bool = True, insecure: bool = False,
             only: tuple[str, ...] = ()) -> dict:
    """Run (or resume) a grid, or the cells of it that `only` selects (`selected_cells`); returns a
    summary {done, failed, seconds, report}.

    The Ray cluster and the Prefect API the run uses must keep others out (`flows.security`);
    `insecure` lets it go on where they do not, and the run records what it let through.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from qrobust.flows.runners import prefect_settings
    from qrobust.flows.security import check_prefect_api

    flow = grid_flow.with_options(task_runner=runner.task_runner())
    with prefect_settings(), prefect_logs_to(workspace.logs / "prefect.log"):
        waived = tuple(check_prefect_api(insecure))
        if runner.name == "threads":
            return flow(grid, workspace, runner, recompute, report, waived, only)
        with ray_session(runner, grid.scale, _gpu_stages(grid), insecure) as session, \
                temporary_settings({PREFECT_API_URL: session.api_url}):
            return flow(grid, workspace, runner, recompute, report, waived + session.waived, only)


def _gpu_stages(grid: GridConfig) -> set[str]:
    """The GPU stages this grid runs."""
    stages_run = {"generate"}
    if any(m.quantizes for m in grid.methods):
        stages_run.add("quantize")
    if any(m.needs_curvature for m in grid.methods):
        stages_run.add("hessian")
    return stages_run


def _flow(fn):
    from prefect import flow

    return flow(name="qrobust-grid", log_prints=False, validate_parameters=False, persist_result=False)(fn)


@_flow
def grid_flow(grid: GridConfig, workspace: Workspace, runner: RunnerSpec = RunnerSpec(),
              recompute: frozenset[str] = frozenset(), report: bool = True, waived: tuple[str, ...] = (),
              only: tuple[str, ...] = ()) -> dict:
    """`waived`: what `--insecure` let through (one line each), recorded before anything runs."""
    from qrobust.tasks.storage.store import Store, write_pairs, write_published_scores

    started = time.perf_counter()
    store = Store(workspace.store_path)
    plans = plan_grid(grid, only)
    progress = GridProgress(len(plans))
    run = GridRun(grid, workspace, store, progress, Submitter(workspace, runner, grid.scale, recompute), waived)
    run.record_waived()
    store.write(write_pairs, grid.pairs)
    store.write(write_published_scores, grid.published)
    run.start(plans)
    run.follow()
    run.finish(report, recompute)
    progress.close()
    return {**progress.counts, "seconds": time.perf_counter() - started, "report": run.report_paths}


@dataclass
class GridRun:
    """The flow's bookkeeping: which call each future is, which cells wait for it."""

    grid: GridConfig
    workspace: Workspace
    store: "Store"
    progress: "GridProgress"
    submitter: Submitter
    waived: tuple[str, ...] = ()  # what --insecure let through
    waiting: dict[StageCall, list[CellPlan]] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)  # id(cell plan) -> calls not yet finished
    outcomes: dict[StageCall, Any] = field(default_factory=dict)  # artifact, or the failure's one line
    backend: str | None = None
    report_paths: dict | None = None

    def record_waived(self) -> None:
        """Each thing `--insecure` let through: announced, one `stage_events` row (stage `security`,
        state `Insecure`) for the run, and `insecure` in the config_json of every cell it stores."""
        from qrobust.tasks.storage.store import record_event

        for problem in self.waived:
            self.progress.note(f"[yellow]insecure: {problem}[/yellow]")
            self.store.write(record_event, self.grid.name, "security", "Insecure", error=problem)

    def start(self, plans: list[CellPlan]) -> None:
        for plan in plans:
            if plan.error:
                self.record_failure(plan.cell, plan.error)
            calls = list(dict.fromkeys(plan.calls))
            self.pending[id(plan)] = len(calls)
            for call in calls:
                self.waiting.setdefault(call, []).append(plan)
                self.submitter.submit(call)
            if not calls and not plan.error:
                self.store_cell(plan)

    def follow(self) -> None:
        """Record each call as it ends, and store each cell once all its calls have ended."""
        from prefect.futures import as_completed

        for future in as_completed(self.submitter.futures()):
            call = self.submitter.call_of(future)
            self.outcomes[call] = self.record_call(call, future)
            for plan in self.waiting.get(call, []):
                self.pending[id(plan)] -= 1
                if self.pending[id(plan)] == 0 and not plan.error:
                    self.close_cell(plan)

    def record_call(self, call: StageCall, future) -> Any:
        from qrobust.tasks.storage.store import record_event

        future.wait()  # as_completed says the run ended; wait() reads its final state
        state = future.state
        if state.is_pending():  # an upstream call failed: the cell's error names that one
            return Skipped()
        if not state.is_completed():
            error = _error_of(future)
            self.store.write(record_event, call.subject, call.stage.name, state.name, shard=call.shard, error=error,
                             key=call.key)
            return Failed(error)
        artifact = future.result()
        code = call.stage.code(call.planned_inputs)
        self.store.write(record_event, call.subject, call.stage.name, state.name, seconds=artifact.run.seconds,
                         shard=call.shard, placement=artifact.run.placement, key=call.key, code=code,
                         versions=call.stage.versions(), started_at=artifact.run.started_at)
        self.after(call, artifact)
        return artifact

    def after(self, call: StageCall, artifact) -> None:
        """What the store keeps of some artifacts as they arrive."""
        if call.stage.name == "hessian":
            from qrobust.tasks.stages.hessian import read_traces
            from qrobust.tasks.storage.store import write_layer_sensitivity

            model = call.inputs[0].inputs[0].name
            self.store.write(write_layer_sensitivity, model, artifact.estimator, read_traces(artifact, self.workspace))
        elif call.stage.name == "execute":
            self.note_backend(call, artifact)
        elif call.stage.name == "generate":
            self.progress.shard_done(call.subject)

    def note_backend(self, call: StageCall, judged) -> None:
        """A change of sandbox backend in the middle of a grid is announced and recorded."""
        from qrobust.tasks.storage.store import record_event

        if self.backend is not None and judged.backend != self.backend:
            reason = f" ({judged.fallback_reason})" if judged.fallback_reason else ""
            change = f"{self.backend} -> {judged.backend}{reason}"
            self.progress.note(f"[yellow]sandbox backend changed: {change}[/yellow]")
            self.store.write(record_event, call.subject, "sandbox", "BackendChanged", shard=call.shard, error=change)
        self.backend = judged.backend

    def close_cell(self, plan: CellPlan) -> None:
        failure = next((self.outcomes[c] for c in plan.calls if isinstance(self.outcomes.get(c), Failed)), None)
        if failure is None:
            self.store_cell(plan)
            return
        failed_call = next(c for c in plan.calls if self.outcomes.get(c) is failure)
        self.record_failure(plan.cell, f"{FAILED_PART[failed_call.stage.name]} failed: {failure.error}")

    def store_cell(self, plan: CellPlan) -> None:
        from qrobust.tasks.numerics.stats import cell_result
        from qrobust.tasks.stages.execute import judged_samples
        from qrobust.tasks.storage.store import write_cell

        cell = plan.cell
        try:
            shards = [(self.outcomes[g], self.outcomes[e]) for g, e in plan.shards]
            samples = [s for generated, judged in shards for s in judged_samples(generated, judged, self.workspace)]
            checkpoint = self.outcomes.get(plan.checkpoint)
            result = cell_result(checkpoint, [generated for generated, _ in shards], samples)
            sandbox = shards[0][1].backend if shards else None
            record = self.run_record(plan, "done", sandbox=sandbox)
            self.store.write(write_cell, cell, record, samples, result)
        except Exception as exc:
            self.record_failure(cell, f"execution failed: {_one_line(exc)}")
            return
        self.progress.cell_done(cell, result.pass_at_1)

    def run_record(self, plan: CellPlan, status: str, error: str | None = None, sandbox: str | None = None) -> dict:
        from qrobust.tasks.benchmarks import benchmark_format, format_record
        from qrobust.tasks.config import canonical

        cell = plan.cell
        config = {
            "cell": canonical(cell),
            "format": format_record(benchmark_format(cell.benchmark.name, cell.model.prompt_style)),
            "sandbox": canonical(self.grid.sandbox_for(cell.model)),
            "grid": self.grid.name,
            **self.insecure_record(),
        }
        stage_keys = [{"stage": c.stage.name, "shard": c.shard, "key": c.key} for c in plan.calls]
        checkpoint = self.outcomes.get(plan.checkpoint)
        module_bits = checkpoint.module_bits if hasattr(checkpoint, "module_bits") else {}
        generated = [self.outcomes.get(g) for g, _ in plan.shards]
        return {"config": config, "status": status, "error": error, "sandbox": sandbox, "stage_keys": stage_keys,
                "module_bits": module_bits,
                "environments": [g.environment for g in generated if getattr(g, "environment", None)],
                "quantize_environment": getattr(checkpoint, "environment", None)}

    def insecure_record(self) -> dict:
        return {"insecure": list(self.waived)} if self.waived else {}

    def record_failure(self, cell: Cell, error: str) -> None:
        from qrobust.tasks.storage.store import record_event, write_cell

        from qrobust.tasks.config import canonical

        config = {"cell": canonical(cell), "grid": self.grid.name, **self.insecure_record()}
        record = {"config": config, "status": "failed", "error": error}

        def write(con) -> None:
            write_cell(con, cell, record, [], None)
            record_event(con, cell.cell_id, "cell", "Failed", error=error)

        self.store.write(write)
        self.progress.cell_failed(cell, error)

    def finish(self, report: bool, recompute: frozenset[str]) -> None:
        from qrobust.tasks.pairs import pair_facts
        from qrobust.tasks.storage.store import write_pair_matching
        from qrobust.tasks.storage.views import refresh_statistics

        prepared = {call.inputs[0].name: outcome for call, outcome in self.outcomes.items()
                    if call.stage.name == "prepare-model" and not isinstance(outcome, (Failed, Skipped))}
        self.store.write(write_pair_matching, pair_facts(self.grid, prepared))
        self.store.write(refresh_statistics)
        if report:
            from qrobust.tasks.stages.report import write_workspace_report

            self.report_paths = write_workspace_report(self.workspace, self.store, recompute="report" in recompute)


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Skipped:
    """Not run: an upstream call failed."""


def _error_of(future) -> str:
    try:
        future.result()
    except Exception as exc:  # a failed or crashed run re-raises its own error, of any type
        return _one_line(exc)
    return f"task ended {future.state.name}"


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


class GridProgress:
    """A rich progress bar over the grid's cells, with one line per finished or failed cell."""

    def __init__(self, n_cells: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, log_path=False)
        self.counts = {"done": 0, "failed": 0}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("grid cells", total=n_cells)

    def shard_done(self, subject: str) -> None:
        self.progress.update(self.task, description=f"generated a shard of {subject[:8]}")

    def cell_done(self, cell: Cell, pass_at_1: float) -> None:
        self.counts["done"] += 1
        self.progress.advance(self.task)
        self.progress.console.log(f"{cell.label}: pass@1 {pass_at_1:.3f}")

    def cell_failed(self, cell: Cell, error: str) -> None:
        self.counts["failed"] += 1
        self.progress.advance(self.task)
        self.progress.console.log(f"[red]{cell.label}: FAILED[/red] {error}")

    def note(self, text: str) -> None:
        self.progress.console.log(text)

    def close(self) -> None:
        self.progress.update(self.task, description="grid cells")
        self.progress.stop()


# --------------------------------------------------------------------------- staleness

def cell_freshness(plans: list[CellPlan], store_path) -> dict[str, str]:
    """For each stored cell of the plan: "current", or "stale: why" (which stage would run again,
    and whether its code, a library or its inputs changed since the stored result was made)."""
    import json

    from qrobust.tasks.storage.store import query

    runs = query(store_path, "SELECT cell_id, stage_keys FROM runs WHERE status = 'done'")
    stored = {row.cell_id: json.loads(row.stage_keys or "[]") for row in runs.itertuples(index=False)}
    events = query(store_path, """
        SELECT e.stage, e.shard, e.key, e.code_hash, e.versions, f.modules
        FROM stage_events e LEFT JOIN code_fingerprints f USING (code_hash)
        WHERE e.key IS NOT NULL AND e.state IN ('Completed', 'Cached')""")
    made_by = {(row.stage, row.key): row for row in events.itertuples(index=False)}
    freshness = {}
    for plan in plans:
        if plan.cell.cell_id not in stored:
            continue
        old_keys = {(k["stage"], k["shard"]): k["key"] for k in stored[plan.cell.cell_id]}
        changed = next((c for c in plan.calls if old_keys.get((c.stage.name, c.shard)) != c.key), None)
        if changed is None:
            freshness[plan.cell.cell_id] = "current"
            continue
        old = made_by.get((changed.stage.name, old_keys.get((changed.stage.name, changed.shard))))
        freshness[plan.cell.cell_id] = f"stale: {changed.stage.name} {_why_changed(changed, old)}"
    return freshness


def _why_changed(call: StageCall, old) -> str:
    import json

    if old is None:
        return "has no record of how it was made"
    code = call.stage.code(call.planned_inputs)
    if old.code_hash != code.digest:
        before = json.loads(old.modules) if isinstance(old.modules, str) else {}
        now = dict(code.modules)
        modules = sorted(m for m in set(before) | set(now) if before.get(m) != now.get(m))
        return f"code changed ({', '.join(modules) or 'its modules'})"
    before, now = json.loads(old.versions or "{}"), call.stage.versions()
    libraries = [f"{name} {before.get(name)} -> {now[name]}" for name in now if before.get(name) != now[name]]
    if libraries:
        return f"libraries changed ({', '.join(libraries)})"
    return "settings or upstream results changed"
