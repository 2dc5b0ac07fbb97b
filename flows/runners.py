"""Where the grid's stages run: Prefect's default thread runner, or a Ray cluster through prefect-ray.

`StageRunner` submits the stage tasks and hands each finished one back to the flow. On Ray,
every stage is submitted as soon as its inputs exist, with the resources the grid's `[scale]`
table asks for (a GPU per hessian, quantize and generate run by default; sandbox execution on
CPU), so independent cells run side by side on the cluster. On the thread runner the flow
waits for each stage but execution as soon as it is submitted: models load one at a time in
the flow's own process, while answers are judged in the background.

Every stage runs inside a lock on its cache key (`qrobust.tasks.runtime.locks`), so runs sharing a
workspace never compute the same thing twice; results, artifacts and the store live in the
workspace, which every Ray worker must reach at the same path.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable
from urllib.parse import urlparse

from qrobust.tasks.config import GPU_STAGES, ScaleSpec

RUNNERS = ("threads", "ray")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Sandbox execution is the only stage the thread runner leaves running while the flow goes on.
BACKGROUND_STAGE = "execute"


class RunnerUnavailable(ValueError):
    """The chosen runner cannot start (Ray missing, cluster unreachable); the message is one line."""


@dataclass(frozen=True)
class RunnerSpec:
    """Which Prefect task runner runs the grid: `threads` (one process) or `ray` (at `address`,
    or a local Ray instance when there is none)."""

    name: str = "threads"
    address: str | None = None

    def __post_init__(self) -> None:
        if self.name not in RUNNERS:
            raise RunnerUnavailable(f"unknown runner {self.name!r}; allowed: {', '.join(RUNNERS)}")
        if self.address and self.name != "ray":
            raise RunnerUnavailable("--address needs --runner ray")

    def task_runner(self):
        """The Prefect task runner for the grid flow (None: Prefect's default thread runner)."""
        if self.name != "ray":
            return None
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=self.address)


def result_storage(workspace):
    """Where Prefect keeps the stages' cached results: the workspace's cache/ folder, unless a
    storage block is configured (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, e.g. a RemoteFileSystem
    on any fsspec URL). Set on the flow itself so that it holds when the grid flow runs inside
    another flow (a deployment), which would otherwise hand down its own storage."""
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK

    return PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value() or workspace.prefect_results


# --------------------------------------------------------------------------- Ray session

@contextlib.contextmanager
def ray_session(spec: RunnerSpec, scale: ScaleSpec, gpu_stages: set[str]):
    """Join (or start) the Ray cluster for a run and yield the Prefect API URL its workers use.

    `gpu_stages` are the GPU stages the grid runs. A Ray instance this process already started
    is used as it is. Ray workers report their
    task runs to the flow's Prefect API. Without a configured server that is the temporary one
    Prefect starts on this machine's loopback, which workers on other hosts cannot reach: such
    a cluster needs PREFECT_API_URL set to a shared server.
    """
    try:
        import ray
        import prefect_ray  # noqa: F401  (checked here so a missing extra is one clear error)
    except ImportError:
        raise RunnerUnavailable("--runner ray needs Ray: pip install 'qrobust[ray]'") from None

    started_here = not ray.is_initialized()
    if started_here:
        _probe(spec.address)
        try:
            ray.init(address=spec.address, logging_level=logging.WARNING)  # Ray's start-up news is noise here
        except ConnectionError as exc:
            raise RunnerUnavailable(f"cannot join the Ray cluster at {spec.address}: {_first_line(exc)}") from None
    try:
        _check_gpus(scale, gpu_stages)
        api_url = _prefect_api_url()
        _check_workers_reach(api_url)
        yield api_url
    finally:
        if started_here:
            ray.shutdown()


def _probe(address: str | None) -> None:
    """Fail at once on an address nothing listens at (Ray itself would retry for minutes)."""
    if address in (None, "auto", "local"):
        return
    target = urlparse(address if "://" in address else f"ray://{address}")
    try:
        socket.create_connection((target.hostname, target.port), timeout=10).close()
    except (OSError, TypeError, ValueError) as exc:
        raise RunnerUnavailable(f"cannot reach a Ray cluster at {address}: {_first_line(exc)}") from None


def _check_gpus(scale: ScaleSpec, gpu_stages: set[str]) -> None:
    """A stage asking for more GPUs than the cluster has would wait for them forever."""
    import ray

    available = ray.cluster_resources().get("GPU", 0)
    for stage in (s for s in GPU_STAGES if s in gpu_stages):
        if scale.gpus(stage) > available:
            raise RunnerUnavailable(
                f"the Ray cluster has {available:g} GPUs but a {stage} run asks for {scale.gpus(stage):g}; "
                f"set [scale] {stage}_gpus (0 runs it on CPU)"
            )


def _prefect_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    # The same temporary server Prefect would start for this process, started now so that
    # its address can travel to the workers.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def _check_workers_reach(api_url: str) -> None:
    import ray

    if urlparse(api_url).hostname not in LOOPBACK_HOSTS:
        return
    here = ray.util.get_node_ip_address()
    elsewhere = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - {here})
    if elsewhere:
        raise RunnerUnavailable(
            f"Ray nodes on other hosts ({', '.join(elsewhere)}) cannot reach the Prefect API at {api_url}: "
            "run `prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://THIS_HOST:4200/api"
        )


# --------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class StageEvent:
    """How a stage run is recorded in `stage_events`: the cell (or model, or model/method) it
    belongs to, the stage and, for generation and execution, the shard."""

    subject: str
    stage: str
    shard: int | None = None


class StageFailed(Exception):
    """A stage run ended Failed or Crashed; the message is its one-line error."""


@dataclass
class _StageRun:
    task: Any
    args: tuple
    event: StageEvent
    then: Callable[[Any], None] | None = None
    on_error: Callable[[str], None] | None = None
    uses_gpu: bool = True
    refresh: bool = False
    future: Any = field(default=None, repr=False)
    submitted: float = 0.0
    ended: float | None = None

    def seconds(self) -> float:
        """From submission to the end of the run (under Ray, waiting for a free GPU included)."""
        return (self.ended or time.perf_counter()) - self.submitted


class StageRunner:
    """Submits the grid's stage tasks on the flow's task runner and calls the flow back with
    each result. Must be used inside the grid flow; `finish()` returns when every follow-up ran."""

    def __init__(self, runner: RunnerSpec, scale: ScaleSpec, lock_directory, store) -> None:
        self._on_ray = runner.name == "ray"
        self._scale = scale
        self._lock_directory = lock_directory
        self._store = store
        self._locked_tasks: dict[str, Any] = {}
        self._in_flight = 0
        self._finished: queue.SimpleQueue[_StageRun] = queue.SimpleQueue()

    def run(self, task, *args, event: StageEvent):
        """Run a stage and wait for it; returns its result or raises StageFailed."""
        return self._outcome(self._launch(_StageRun(task, args, event)))

    def submit(self, task, *args, event: StageEvent, then: Callable[[Any], None],
               on_error: Callable[[str], None], uses_gpu: bool = True) -> None:
        """Start a stage; `then(result)` or `on_error(message)` runs in the flow when it ends.

        `uses_gpu=False` keeps a GPU stage that loads no model this time (full precision has
        nothing to quantize) off the GPUs.
        """
        waits_here = not self._on_ray and event.stage != BACKGROUND_STAGE
        if waits_here:
            self.run_finished()  # store what finished meanwhile before the flow blocks again
        run = self._launch(_StageRun(task, args, event, then, on_error, uses_gpu))
        if waits_here:
            self._follow_up(run)
            return
        self._in_flight += 1
        run.future.add_done_callback(lambda _: self._ended(run))

    def run_finished(self) -> None:
        """Run the follow-ups of the stages that have finished, without waiting for others."""
        while True:
            try:
                run = self._finished.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            self._follow_up(run)

    def finish(self) -> None:
        """Run follow-ups as stages finish until none is left (follow-ups may submit more)."""
        while self._in_flight:
            run = self._finished.get()
            self._in_flight -= 1
            self._follow_up(run)

    def _ended(self, run: _StageRun) -> None:
        """Called by the task runner, from its own thread, when a submitted run ends."""
        run.ended = time.perf_counter()
        self._finished.put(run)

    def _launch(self, run: _StageRun) -> _StageRun:
        task = self._locked(run.task)
        run.submitted = time.perf_counter()
        if run.refresh:
            task = task.with_options(refresh_cache=True)
        if self._on_ray:
            from prefect_ray.context import remote_options

            with remote_options(**self.ray_options(run.event.stage if run.uses_gpu else None)):
                run.future = task.submit(*run.args)
        else:
            run.future = task.submit(*run.args)
        return run

    def ray_options(self, stage: str | None) -> dict:
        """What one run of `stage` reserves on the cluster (Ray's CPU default of 1 stays).

        Ray gives a GPU stage a fresh worker process each time (its default for GPU tasks),
        so a model's GPU memory is freed with its process and no worker carries a CUDA
        context over to a GPU it was not assigned.
        """
        gpus = self._scale.gpus(stage) if stage else 0
        return {"num_gpus": gpus, "max_retries": self._scale.worker_retries}

    def _locked(self, task):
        from qrobust.tasks.runtime.locks import one_run_per_key

        if task.name not in self._locked_tasks:
            self._locked_tasks[task.name] = one_run_per_key(task, self._lock_directory)
        return self._locked_tasks[task.name]

    def _follow_up(self, run: _StageRun) -> None:
        try:
            result = self._outcome(run)
        except StageFailed as exc:
            run.on_error(str(exc))
            return
        run.then(result)

    def _outcome(self, run: _StageRun):
        """Wait for a stage run and record it; a cached manifest whose artifact was deleted
        is computed again."""
        from qrobust.tasks.runtime.workspace import artifact_exists

        run.future.wait()
        state = run.future.state
        if not state.is_completed():
            error = _error_of(run.future)
            self._record(run.event, state.name, seconds=run.seconds(), error=error)
            raise StageFailed(error)
        result = run.future.result()
        if isinstance(result, dict) and result.get("path") and not artifact_exists(result) and not run.refresh:
            return self._outcome(self._launch(replace(run, refresh=True, future=None, ended=None)))
        # A cache hit's manifest tells where it was computed once, not where this run went.
        placement = result.get("placement") if isinstance(result, dict) and state.name != "Cached" else None
        self._record(run.event, state.name, seconds=run.seconds(), placement=placement)
        return result

    def _record(self, event: StageEvent, state: str, seconds: float, error: str | None = None,
                placement: dict | None = None) -> None:
        from qrobust.tasks.storage.store import record_event

        self._store.write(record_event, event.subject, event.stage, state, seconds, shard=event.shard, error=error,
                          placement=placement)


def _error_of(future) -> str:
    try:
        future.result()
    except Exception as exc:  # a failed or crashed run re-raises its own error, of any type
        return _first_line(exc, with_type=True)
    return f"task ended {future.state.name}"


def _first_line(exc: BaseException, with_type: bool = False) -> str:
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:500]
