"""The pipeline's cached Prefect tasks: thin wrappers over each stage's pure function.

Each wrapper only adapts arguments; the work lives in the stage's own module.
"""

from __future__ import annotations

from tasks.caching import stage
from tasks.config import CalibrationSpec, Cell, MethodSpec, ModelSpec, SandboxSpec
from tasks.workspace import Workspace


@stage("prepare-model")
def prepare_model_task(spec: ModelSpec, workspace: Workspace) -> dict:
    from tasks.models.loading import prepare_model

    return prepare_model(spec, workspace)


@stage("calibration")
def calibration_task(spec: CalibrationSpec, model_manifest: dict, workspace: Workspace) -> dict:
    from tasks.calibration import build_calibration

    return build_calibration(spec, model_manifest, workspace)


@stage("hessian")
def hessian_task(model_manifest: dict, method: MethodSpec, calibration: dict, workspace: Workspace) -> dict:
    from tasks.hawq import compute_layer_traces

    return compute_layer_traces(model_manifest, method, calibration, workspace)


@stage("allocation")
def allocation_task(model_manifest: dict, method: MethodSpec, traces: dict, workspace: Workspace) -> dict:
    from tasks.hawq import allocate

    return allocate(model_manifest, method, traces, workspace)


@stage("quantize")
def quantize_task(model_manifest: dict, method: MethodSpec, calibration: dict | None, workspace: Workspace,
                  allocation: dict | None = None) -> dict:
    from tasks.quantize import quantize_model

    return quantize_model(model_manifest, method, calibration, workspace, allocation)


@stage("generate-shard")
def generate_task(cell: Cell, checkpoint: dict, task_ids: tuple[str, ...], workspace: Workspace) -> dict:
    from tasks.generate.shard import generate_shard

    return generate_shard(cell, checkpoint, task_ids, workspace)


@stage("execute-shard", retries=1)
def execute_task(cell: Cell, generation: dict, sandbox: SandboxSpec, workspace: Workspace) -> dict:
    from tasks.execute import execute_shard

    return execute_shard(cell, generation, sandbox, workspace)
