"""The pipeline's cached Prefect tasks: thin wrappers over each stage's pure function.

Each wrapper only adapts arguments; the work lives in the stage's own module. A stage run
by a Ray worker also says where it ran: its manifest gains `placement` (the node, the worker
process and the resources Ray assigned it, GPUs included), which the flow records in
`stage_events`.
"""

from __future__ import annotations

import os
import sys

from qrobust.tasks.runtime.caching import stage
from qrobust.tasks.config import CalibrationSpec, Cell, MethodSpec, ModelSpec, SandboxSpec
from qrobust.tasks.runtime.workspace import Workspace


def placed(manifest: dict) -> dict:
    """`manifest`, plus where it was computed when a Ray worker computed it."""
    if "ray" not in sys.modules:  # Ray is imported in every Ray worker; never import it here
        return manifest
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return manifest  # this process drives Ray (or ran it once): the stage ran here, not on a worker
    placement = {
        "node": ray.util.get_node_ip_address(),
        "pid": os.getpid(),  # the worker process, whose log Ray keeps under that pid
        "resources": ray.get_runtime_context().get_assigned_resources(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
    }
    return {**manifest, "placement": placement}


@stage("prepare-model")
def prepare_model_task(spec: ModelSpec, workspace: Workspace) -> dict:
    from qrobust.tasks.models.loading import prepare_model

    return placed(prepare_model(spec, workspace))


@stage("calibration")
def calibration_task(spec: CalibrationSpec, model_manifest: dict, workspace: Workspace) -> dict:
    from qrobust.tasks.stages.calibration import build_calibration

    return placed(build_calibration(spec, model_manifest, workspace))


@stage("hessian")
def hessian_task(model_manifest: dict, method: MethodSpec, calibration: dict, workspace: Workspace) -> dict:
    from qrobust.tasks.stages.hessian import compute_layer_traces

    return placed(compute_layer_traces(model_manifest, method, calibration, workspace))


@stage("allocation")
def allocation_task(model_manifest: dict, method: MethodSpec, traces: dict, workspace: Workspace) -> dict:
    from qrobust.tasks.stages.hessian import allocate

    return placed(allocate(model_manifest, method, traces, workspace))


@stage("quantize")
def quantize_task(model_manifest: dict, method: MethodSpec, calibration: dict | None, workspace: Workspace,
                  allocation: dict | None = None) -> dict:
    from qrobust.tasks.stages.quantize import quantize_model

    return placed(quantize_model(model_manifest, method, calibration, workspace, allocation))


@stage("generate-shard")
def generate_task(cell: Cell, checkpoint: dict, task_ids: tuple[str, ...], workspace: Workspace) -> dict:
    from qrobust.tasks.stages.generate import generate_shard

    return placed(generate_shard(cell, checkpoint, task_ids, workspace))


@stage("execute-shard", retries=1)
def execute_task(cell: Cell, generation: dict, sandbox: SandboxSpec, workspace: Workspace) -> dict:
    from qrobust.tasks.stages.execute import execute_shard

    return placed(execute_shard(cell, generation, sandbox, workspace))
