"""HAWQ stages: per-layer loss-Hessian traces, then an exact bit allocation under a budget.

The traces (qrobust.tasks.numerics.curvature) depend on the model, the calibration set and the estimator,
not on the budget, so every budget of a model reuses one trace artifact. The loss is the
family's own: next-token cross-entropy for AR models; for diffusion models the
masked-denoising loss on the calibration set's stored masked inputs (mask ratios varied
over samples, loss on masked positions weighted by 1/t, logits shifted as the model uses
them) -- the modified HAWQ documented in tasks/hessian.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from qrobust.tasks.config import ALLOWED_BITS, MethodSpec, config_hash
from qrobust.tasks.runtime.workspace import Workspace, read_manifest, write_manifest

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


def calibration_batches(calibration: dict, device: str) -> list[dict]:
    from qrobust.tasks.stages.calibration import load_calibration

    tensors = load_calibration(calibration)
    n = tensors["input_ids"].shape[0]
    return [
        {name: value[start : start + BATCH_SIZE].to(device) for name, value in tensors.items()}
        for start in range(0, n, BATCH_SIZE)
    ]


def trace_key(model_manifest: dict, method: MethodSpec, calibration: dict) -> str:
    return config_hash({
        "model": model_manifest["key"], "calibration": calibration["key"], "estimator": method.estimator,
        "probes": method.probes, "tolerance": method.trace_tolerance,
    })


def compute_layer_traces(model_manifest: dict, method: MethodSpec, calibration: dict, workspace: Workspace) -> dict:
    """Per-layer Hessian traces of the base model; returns the trace artifact's manifest."""
    key = trace_key(model_manifest, method, calibration)
    directory = workspace.artifact_dir("traces", key)
    if (directory / "manifest.json").exists():
        return read_manifest(directory)
    import time

    import torch

    from qrobust.tasks.numerics.curvature import activation_traces, fisher_traces, hutchinson_traces
    from qrobust.tasks.models.loading import checkpoint_location, default_device

    from transformers import AutoModelForCausalLM

    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_location(model_manifest), dtype=torch.float32,
        trust_remote_code=model_manifest.get("trust_remote_code", False),
    ).to(device)
    batches = calibration_batches(calibration, device)
    diffusion = model_manifest["family"] == "diffusion"
    loss_fn = diffusion_loss_with_stored_masks(model_manifest["logits_shift"]) if diffusion else ar_loss
    started = time.perf_counter()
    if method.estimator == "hutchinson":
        traces = hutchinson_traces(model, loss_fn, batches, probes=method.probes,
                                   tolerance=method.trace_tolerance, seed=0)
    elif method.estimator == "fisher":
        traces = fisher_traces(model, loss_fn, batches)
    else:
        traces = activation_traces(model, batches, _forward_fn(diffusion, model_manifest["logits_shift"]))
    seconds = time.perf_counter() - started
    with workspace.new_artifact("traces", key) as scratch:
        (scratch / TRACES).write_text(json.dumps({
            name: {"n_params": t.n_params, "trace": t.trace_mean, "trace_stderr": t.trace_stderr, "probes": t.probes}
            for name, t in traces.items()
        }, indent=1))
        write_manifest(scratch, {"key": key, "path": str(directory), "estimator": method.estimator,
                                 "seconds": seconds, "device": device})
    return read_manifest(directory)


def _forward_fn(diffusion: bool, logits_shift: bool):
    if not diffusion:
        return lambda model, batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from qrobust.tasks.models.diffusion import diffusion_logits

    return lambda model, batch: diffusion_logits(model, batch["masked_input_ids"], batch["attention_mask"], logits_shift)


def read_traces(manifest: dict) -> dict[str, dict]:
    return json.loads((Path(manifest["path"]) / TRACES).read_text())


def allocate(model_manifest: dict, method: MethodSpec, traces_manifest: dict, workspace: Workspace) -> dict:
    """Bits per module minimising total sensitivity under the method's average-bit budget."""
    import torch

    from qrobust.tasks.numerics.bit_allocation import allocate_bits, average_bits, dynamic_map, layer_sensitivities, tie_groups_for
    from qrobust.tasks.numerics.curvature import LayerTrace
    from qrobust.tasks.models.loading import checkpoint_location

    from transformers import AutoModelForCausalLM

    traces = {
        name: LayerTrace(name=name, n_params=t["n_params"], trace_mean=t["trace"], trace_stderr=t["trace_stderr"],
                         probes=t["probes"])
        for name, t in read_traces(traces_manifest).items()
    }
    model = AutoModelForCausalLM.from_pretrained(checkpoint_location(model_manifest), dtype=torch.float32)
    weights = {name: model.get_submodule(name).weight.detach() for name in traces}
    sensitivity = layer_sensitivities(traces, weights, ALLOWED_BITS, method.group_size, method.sym)
    n_params = {name: t.n_params for name, t in traces.items()}
    bits = allocate_bits(sensitivity, n_params, method.budget, tie_groups_for(list(traces), method.tie))
    default_bits = max(set(bits.values()), key=list(bits.values()).count)
    return {
        "bits": bits,
        "default_bits": default_bits,
        "dynamic": dynamic_map(bits, default_bits),
        "avg_bits": average_bits(bits, n_params),
        "sensitivity": {name: {str(b): v for b, v in options.items()} for name, options in sensitivity.items()},
    }
