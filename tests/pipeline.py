"""Stages run directly (without Prefect), as the tests of stages and models need them."""

from __future__ import annotations


def prepare(spec, workspace):
    from qrobust.tasks.stages.prepare_model import STAGE

    return STAGE.run(workspace, (spec,))


def calibrate(spec, model, workspace):
    from qrobust.tasks.stages.calibration import STAGE

    return STAGE.run(workspace, (spec, model))


def quantize(model, method, calibration, workspace, allocation=None):
    from qrobust.tasks.stages.quantize import STAGE

    return STAGE.run(workspace, (model, method, calibration if method.needs_calibration else None, allocation))
