"""A pipeline stage: a pure function behind one cache that follows the code.

A `Stage` names its function, the artifact type it makes, the libraries whose numerics it uses
and whether it loads a model. Running it with some inputs:

1. computes its key from the inputs (configs by value, upstream artifacts by their keys), the
   source of the modules that compute it (`fingerprint.code_fingerprint` of the function's
   module and of any method object among the inputs, with what they import) and the versions
   of its libraries;
2. under a lock on that key (one computation per key across threads, processes and machines),
   reuses `artifacts/<stage>/<key>/` if a readable manifest is there, else calls the function
   with a scratch directory that becomes that artifact when it returns.

This is the only cache: Prefect keeps no results (the task is run with caching off), and
nothing in a cache folder is ever unpickled. The key is a pure function of the configuration,
so the flow computes every stage's key before anything runs (`ArtifactRef`), and
`qrobust status` says which stored results are stale and why.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qrobust.tasks.artifacts import Artifact, ArtifactUnreadable, RunInfo, read_manifest, write_manifest
from qrobust.tasks.runtime.fingerprint import CodeFingerprint, code_fingerprint, library_versions
from qrobust.tasks.runtime.locks import FifoLock, key_lock
from qrobust.tasks.runtime.workspace import Workspace

# Bumped when the way keys are computed changes, so that no key of another scheme is ever reused.
KEY_SCHEME = 2
logger = logging.getLogger("qrobust.cache")
# Stages that load a model take turns on this process's device (one model at a time), in the
# order they asked; the others (tokenising, sandboxed execution) run beside them.
DEVICE = FifoLock()


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact known by its key before it exists: what the flow plans with."""

    stage: str
    key: str


@dataclass(frozen=True)
class StageContext:
    """What a stage function is given besides its inputs."""

    key: str
    directory: Path  # scratch: becomes artifacts/<stage>/<key>/ when the function returns
    workspace: Workspace

    @property
    def log(self) -> Path:
        """This run's log file, for what third-party libraries print."""
        return self.workspace.logs / f"{self.directory.parent.name}-{self.key}.log"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline; `name` is its one spelling everywhere (stage_events, the
    artifacts folder, `[scale]`, `--recompute`)."""

    name: str
    function: Callable[..., Artifact]  # function(context, *inputs) -> artifact
    artifact: type[Artifact]
    libraries: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()  # code the stage uses without importing it (a file it ships)
    loads_model: bool = False
    retries: int = 0
    code_for: Callable[[tuple], tuple[str, ...]] | None = None  # modules chosen by the inputs

    def code(self, inputs: tuple) -> CodeFingerprint:
        roots = {self.function.__module__, *self.extra_modules}
        for value in inputs:  # a method's own module decides what the quantize stage does with it
            roots.update(getattr(value, "code_modules", ()))
        if self.code_for is not None:
            roots.update(self.code_for(inputs))
        return code_fingerprint(tuple(sorted(roots)))

    def versions(self) -> dict[str, str]:
        return library_versions(("python", *self.libraries))

    def key(self, inputs: tuple) -> str:
        material = {
            "scheme": KEY_SCHEME,
            "stage": self.name,
            "inputs": [key_material(value) for value in inputs],
            "code": self.code(inputs).digest,
            "libraries": self.versions(),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]

    def cached(self, workspace: Workspace, key: str) -> Artifact | None:
        """The artifact at `key` if a readable one is there; a damaged or foreign manifest is a miss."""
        directory = workspace.artifact_dir(self.name, key)
        try:
            return read_manifest(directory, self.artifact)
        except FileNotFoundError:
            return None
        except (ArtifactUnreadable, OSError, UnicodeDecodeError) as exc:
            logger.warning("ignoring unreadable %s artifact %s: its manifest %s; computing it again",
                           self.name, directory, exc)
            return None

    def run(self, workspace: Workspace, inputs: tuple, recompute: bool = False) -> Artifact:
        """The stage's artifact for `inputs`: from the cache, or computed now (`recompute` forces it)."""
        from qrobust.tasks.runtime.environment import set_library_environment

        set_library_environment()
        started_at, started = time.time(), time.perf_counter()
        key = self.key(inputs)
        with key_lock(workspace.locks, f"{self.name}-{key}"):
            artifact = None if recompute else self.cached(workspace, key)
            cached = artifact is not None
            if not cached:
                artifact = self._compute(workspace, key, inputs, replace=True)
        run = RunInfo(cached=cached, seconds=time.perf_counter() - started, started_at=started_at,
                      placement=ray_placement())
        return artifact.with_run(run)

    def _compute(self, workspace: Workspace, key: str, inputs: tuple, replace: bool) -> Artifact:
        device = DEVICE.held() if self.loads_model else _nothing()
        with device, workspace.new_artifact(self.name, key, replace=replace) as scratch:
            if self.loads_model:
                reset_global_random_state()
            artifact = self.function(StageContext(key, scratch, workspace), *inputs)
            if not isinstance(artifact, self.artifact) or artifact.key != key:
                raise TypeError(f"stage {self.name} returned {artifact!r}, not a {self.artifact.__name__} keyed {key}")
            write_manifest(scratch, artifact)
        return artifact


def reset_global_random_state(seed: int = 0) -> None:
    """Seed the process-wide generators, so that what a stage computes never depends on what ran
    before it in the same process (gptqmodel, for one, draws from torch's global generator).
    Only stages holding the device call it, one at a time."""
    import random

    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def key_material(value: Any) -> Any:
    """What of an input enters a key: artifacts by key, configs by value (with their type)."""
    if isinstance(value, (Artifact, ArtifactRef)):
        return {"artifact": value.stage, "key": value.key}
    if isinstance(value, Workspace):
        raise TypeError("the workspace is not an input of a stage; it is given to every stage")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: key_material(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [key_material(v) for v in value]
    if isinstance(value, dict):
        return {str(k): key_material(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"a stage input of type {type(value).__name__} has no key material")


def ray_placement() -> dict | None:
    """Where this process runs when it is a Ray worker: node, pid, resources and GPU ids."""
    if "ray" not in sys.modules:  # Ray is imported in every Ray worker; never import it here
        return None
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # this process drives Ray (or ran it once): the stage ran here, not on a worker
    return {
        "node": ray.util.get_node_ip_address(),
        "pid": os.getpid(),  # the worker process, whose log Ray keeps under that pid
        "resources": ray.get_runtime_context().get_assigned_resources(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
    }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- as a Prefect task

def run_stage(stage: Stage, workspace: Workspace, inputs: tuple, recompute: bool = False, subject: str = ""):
    """The Prefect task body: the stage's artifact, in a state named Cached when nothing was computed."""
    artifact = stage.run(workspace, inputs, recompute=recompute)
    if artifact.run.cached:
        from prefect.states import Completed

        return Completed(data=artifact, name="Cached", message=f"{stage.name} {artifact.key} from the workspace")
    return artifact


@functools.lru_cache(maxsize=None)
def prefect_task(stage: Stage):
    """The stage as a Prefect task: Prefect records the run and its upstream edges; it caches nothing."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(run_stage, name=stage.name, task_run_name="{subject}", cache_policy=NO_CACHE,
                persist_result=False, retries=stage.retries, log_prints=False)
