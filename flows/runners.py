"""Where the grid's stages run: Prefect's thread runner, or a Ray cluster through prefect-ray.

`Submitter` submits every stage call at once, its upstream futures as arguments; the task
runner starts each when its inputs exist. On the thread runner, stages that load a model take
turns on the device (`tasks.runtime.stage.DEVICE`, one model at a time, in the order they
became ready) while sandboxed execution and tokenising run beside them. On Ray, each call
reserves what the grid's `[scale]` table asks for its stage, so independent cells run side by
side on the cluster.

Every stage runs inside a lock on its cache key (`tasks.runtime.locks`), so runs sharing a
workspace never compute the same thing twice; artifacts and the store live in the workspace,
which every Ray worker must reach at the same path.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from qrobust.flows.security import LOOPBACK_HOSTS
from qrobust.tasks.config import GPU_STAGES, ScaleSpec

RUNNERS = ("threads", "ray")


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


# --------------------------------------------------------------------------- Ray session

@dataclass(frozen=True)
class RaySession:
    """A joined Ray cluster: the Prefect API its workers report to, and what `insecure` let through."""

    api_url: str
    waived: tuple[str, ...] = ()


@contextlib.contextmanager
def ray_session(spec: RunnerSpec, scale: ScaleSpec, gpu_stages: set[str], insecure: bool = False):
    """Join (or start) the Ray cluster for a run and yield its `RaySession`.

    `gpu_stages` are the GPU stages the grid runs. A Ray instance this process already started
    is used as it is. A cluster at an address is asked first whether it demands Ray's token and,
    if it does, whether it accepts this machine's; once joined, a cluster that demands none is
    refused where it has nodes on other hosts (`flows.security`). Ray workers report their
    task runs to the flow's Prefect API. Without a configured server that is the temporary one
    Prefect starts on this machine's loopback, which workers on other hosts cannot reach: such
    a cluster needs PREFECT_API_URL set to a shared server.
    """
    try:
        import ray
        import prefect_ray  # noqa: F401  (checked here so a missing extra is one clear error)
    except ImportError:
        raise RunnerUnavailable("--runner ray needs Ray: pip install 'qrobust[ray]'") from None
    from qrobust.flows.security import check_ray_cluster, check_ray_token_presented, ray_demands_token

    started_here = not ray.is_initialized()
    demands_token = None
    address = _cluster_address(spec.address)
    if started_here:
        if address not in (None, "auto", "local"):
            _probe(address)
            demands_token = ray_demands_token(address)
            if demands_token:
                check_ray_token_presented(address)
        try:
            ray.init(address=spec.address, logging_level=logging.WARNING)  # Ray's start-up news is noise here
        except ConnectionError as exc:
            raise RunnerUnavailable(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None
    try:
        if demands_token is None:  # a cluster found here (auto, a local instance): ask the one joined
            demands_token = ray_demands_token(ray.get_runtime_context().gcs_address)
        elsewhere = _nodes_on_other_hosts()
        cluster = f"the Ray cluster at {address}" if address else "the local Ray instance"
        waived = check_ray_cluster(cluster, demands_token, elsewhere, insecure)
        _check_gpus(scale, gpu_stages)
        api_url = _prefect_api_url()
        _check_workers_reach(api_url, elsewhere)
        yield RaySession(api_url, tuple(waived))
    finally:
        if started_here:
            ray.shutdown()


def _cluster_address(address: str | None) -> str | None:
    """The address `ray.init` will join: the one given, else RAY_ADDRESS (None: a new local instance)."""
    import os

    return address or os.environ.get("RAY_ADDRESS") or None


def _probe(address: str) -> None:
    """Fail at once on an address nothing listens at (Ray itself would retry for minutes)."""
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
        if scale.gpus(stage, available) > available:
            raise RunnerUnavailable(
                f"the Ray cluster has {available:g} GPUs but a {stage} run asks for {scale.gpus(stage, available):g}; "
                f"set [scale] {stage}_gpus (0 runs it on CPU, auto takes one where there are GPUs)"
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


def _nodes_on_other_hosts() -> list[str]:
    """The addresses of the joined cluster's live nodes that are not this host."""
    import ray

    here = ray.util.get_node_ip_address()
    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - {here})


def _check_workers_reach(api_url: str, nodes_elsewhere: list[str]) -> None:
    if urlparse(api_url).hostname in LOOPBACK_HOSTS and nodes_elsewhere:
        raise RunnerUnavailable(
            f"Ray nodes on other hosts ({', '.join(nodes_elsewhere)}) cannot reach the Prefect API at {api_url}: "
            "run a Prefect server every node reaches and set PREFECT_API_URL=http://THAT_HOST:4200/api "
            "(README: Scaling out)"
        )


# --------------------------------------------------------------------------- submitting stage calls

class Submitter:
    """Submits stage calls as Prefect tasks whose arguments are the futures of their upstream calls.

    On Ray each call reserves the resources the grid's `[scale]` table asks for its stage (GPU
    stages one GPU each by default where the cluster has GPUs, sandbox execution and the rest one
    CPU), and a call whose stage loads nothing this time keeps off the GPUs.
    """

    def __init__(self, workspace, runner: RunnerSpec, scale: ScaleSpec, recompute: frozenset[str]) -> None:
        self.workspace = workspace
        self.scale = scale
        self.recompute = recompute
        self.on_ray = runner.name == "ray"
        self._futures: dict[Any, Any] = {}  # call -> future
        self._calls: dict[int, Any] = {}  # id(future) -> call

    def submit(self, call):
        if call in self._futures:
            return self._futures[call]
        from qrobust.flows.grid import StageCall
        from qrobust.tasks.runtime.stage import prefect_task

        inputs = tuple(self.submit(value) if isinstance(value, StageCall) else value for value in call.inputs)
        task = prefect_task(call.stage)
        arguments = (call.stage, self.workspace, inputs)
        options = dict(recompute=call.stage.name in self.recompute, subject=_run_name(call))
        if self.on_ray:
            from prefect_ray.context import remote_options

            with remote_options(**self.ray_options(call.stage.name)):
                future = task.submit(*arguments, **options)
        else:
            future = task.submit(*arguments, **options)
        self._futures[call] = future
        self._calls[id(future)] = call
        return future

    def ray_options(self, stage: str) -> dict:
        """What one run of `stage` reserves on the cluster (Ray's CPU default of 1 stays).

        Ray gives a GPU stage a fresh worker process each time (its default for GPU tasks),
        so a model's GPU memory is freed with its process and no worker carries a CUDA
        context over to a GPU it was not assigned.
        """
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        return {"num_gpus": self.scale.gpus(stage, cluster_gpus), "max_retries": self.scale.worker_retries}

    def futures(self) -> list:
        return list(self._futures.values())

    def call_of(self, future):
        return self._calls[id(future)]


def _run_name(call) -> str:
    shard = "" if call.shard is None else f"#{call.shard}"
    return f"{call.stage.name} {call.subject}{shard}"


# --------------------------------------------------------------------------- Prefect's settings and output

@contextlib.contextmanager
def prefect_settings():
    """Prefect settings every run needs: an offline-safe start (the temporary API server's
    database set-up can exceed Prefect's default start-up limit on a fresh machine) and no
    analytics. A value the user set in the environment wins."""
    import os

    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    updates = {}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 180
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    with temporary_settings(updates):
        yield


@contextlib.contextmanager
def prefect_logs_to(log_file):
    """Library logs go to `log_file`: Prefect's console output (a traceback per failed task run,
    every task run's state, server notices) and torch's warnings. The grid's own progress, one
    line per failed cell and qrobust's own warnings stay on the terminal."""
    import sys

    import torch  # noqa: F401  (torch installs its own stderr handler when first imported)
    from prefect.logging import configuration

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()  # Prefect's handlers exist from now on, so they can be swapped
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    swapped = []
    for logger in map(logging.getLogger, ("", "prefect._internal", "uvicorn", "torch")):
        consoles = [h for h in logger.handlers if type(h) is not logging.FileHandler
                    and isinstance(h, logging.StreamHandler)]
        for console in consoles:
            logger.removeHandler(console)
        logger.addHandler(to_file)
        swapped.append((logger, consoles))
    ours = logging.getLogger("qrobust")
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(logging.Formatter("qrobust: %(levelname)s: %(message)s"))
    ours.addHandler(to_terminal)
    ours.addHandler(to_file)
    ours.propagate = False
    try:
        yield
    finally:
        ours.removeHandler(to_terminal)
        ours.removeHandler(to_file)
        ours.propagate = True
        for logger, consoles in swapped:
            logger.removeHandler(to_file)
            for console in consoles:
                logger.addHandler(console)
        to_file.close()


def _first_line(exc: BaseException, with_type: bool = False) -> str:
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:500]
