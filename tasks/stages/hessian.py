"""Hessian stage (HAWQ): per-layer curvature of the base model's loss on the calibration set.

The traces (`tasks.numerics.curvature`) depend on the model, the calibration set and the
curvature settings, not on the budget, so every budget of a model reuses one trace artifact;
the allocation stage (`tasks.stages.allocation`) turns them into bits. The loss is the
family's own: next-token cross-entropy for AR models; for diffusion models the
masked-denoising loss on the calibration set's stored masked inputs (mask ratios varied
over samples, loss on masked positions weighted by 1/t, logits shifted as the model uses
them) -- the modified HAWQ documented in tasks/numerics/curvature.py.
"""

from __future__ import annotations

import json

from qrobust.tasks.artifacts import CalibrationSet, LayerTraces, PreparedModel
from qrobust.tasks.runtime.stage import Stage, StageContext

TRACES = "traces.json"
BATCH_SIZE = 4


def ar_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())


def diffusion_loss_with_stored_masks(logits_shift: bool):
    """The masked-denoising loss on fixed masks, so traces are reproducible."""
    import torch.nn.functional as F

    from qrobust.tasks.models.diffusion import diffusion_logits

    def loss(model, batch):
        logits = diffusion_logits(model, batch["masked_input_ids"], batch["attention_mask"], logits_shift)
        positions = batch["masked_positions"]
        cross_entropy = F.cross_entropy(logits[positions].float(), batch["input_ids"][positions], reduction="none")
        weights = (1.0 / batch["mask_ratios"])[:, None].expand_as(positions)[positions]
        return (cross_entropy * weights).sum() / positions.numel()

    return loss


def calibration_batches(calibration: CalibrationSet, workspace, device: str) -> list[dict]:
    from qrobust.tasks.stages.calibration import load_calibration

    tensors = load_calibration(calibration, workspace)
    n = tensors["input_ids"].shape[0]
    return [
        {name: value[start : start + BATCH_SIZE].to(device) for name, value in tensors.items()}
        for start in range(0, n, BATCH_SIZE)
    ]


def compute_layer_traces(context: StageContext, prepared: PreparedModel, curvature, calibration: CalibrationSet
                         ) -> LayerTraces:
    """Per-layer Hessian traces of the base model under `curvature` (estimator, probes, tolerance)."""
    import time

    import torch

    from qrobust.tasks.numerics.curvature import activation_traces, fisher_traces, hutchinson_traces
    from qrobust.tasks.runtime.environment import default_device

    from transformers import AutoModelForCausalLM

    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(
        prepared.location(context.workspace), dtype=torch.float32, trust_remote_code=prepared.trust_remote_code,
    ).to(device)
    batches = calibration_batches(calibration, context.workspace, device)
    diffusion = prepared.family == "diffusion"
    loss_fn = diffusion_loss_with_stored_masks(prepared.logits_shift) if diffusion else ar_loss
    started = time.perf_counter()
    if curvature.estimator == "hutchinson":
        traces = hutchinson_traces(model, loss_fn, batches, probes=curvature.probes,
                                   tolerance=curvature.tolerance, seed=0)
    elif curvature.estimator == "fisher":
        traces = fisher_traces(model, loss_fn, batches)
    else:
        traces = activation_traces(model, batches, _forward_fn(diffusion, prepared.logits_shift))
    seconds = time.perf_counter() - started
    (context.directory / TRACES).write_text(json.dumps({
        name: {"n_params": t.n_params, "trace": t.trace_mean, "trace_stderr": t.trace_stderr, "probes": t.probes}
        for name, t in traces.items()
    }, indent=1))
    return LayerTraces(key=context.key, estimator=curvature.estimator, seconds=seconds, device=device)


def _forward_fn(diffusion: bool, logits_shift: bool):
    if not diffusion:
        return lambda model, batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from qrobust.tasks.models.diffusion import diffusion_logits

    return lambda model, batch: diffusion_logits(model, batch["masked_input_ids"], batch["attention_mask"], logits_shift)


def read_traces(traces: LayerTraces, workspace) -> dict[str, dict]:
    return json.loads((traces.directory(workspace) / TRACES).read_text())


STAGE = Stage("hessian", compute_layer_traces, LayerTraces, libraries=("torch", "transformers", "safetensors"),
              loads_model=True)
