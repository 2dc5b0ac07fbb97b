"""Allocation stage (HAWQ): bits per module that minimise total sensitivity under the budget.

Sensitivity of a module at b bits is its Hessian trace per parameter times the squared error of
quantizing its weights to b bits (`tasks.numerics.bit_allocation`); the integer program is solved
exactly, and the result is written as gptqmodel's `dynamic` map for the quantize stage.
"""

from __future__ import annotations

from qrobust.tasks.artifacts import BitAllocation, LayerTraces, PreparedModel
from qrobust.tasks.runtime.stage import Stage, StageContext

CANDIDATE_BITS = (2, 3, 4, 8)


def allocate(context: StageContext, prepared: PreparedModel, method, traces_artifact: LayerTraces) -> BitAllocation:
    """Bits per module for `method` (its budget, group size and tie policy) from the model's traces."""
    from qrobust.tasks.numerics.bit_allocation import (
        allocate_bits,
        average_bits,
        dynamic_map,
        layer_sensitivities,
        tie_groups_for,
    )
    from qrobust.tasks.numerics.curvature import LayerTrace
    from qrobust.tasks.stages.hessian import read_traces

    from transformers import AutoModelForCausalLM

    traces = {
        name: LayerTrace(name=name, n_params=t["n_params"], trace_mean=t["trace"], trace_stderr=t["trace_stderr"],
                         probes=t["probes"])
        for name, t in read_traces(traces_artifact, context.workspace).items()
    }
    from qrobust.tasks.runtime.environment import default_device, torch_dtype

    # the weights as stored, on the device: the quantization errors of every module and width are
    # elementwise work there (float32 inside), seconds on a GPU for a 1.7B model
    model = AutoModelForCausalLM.from_pretrained(prepared.location(context.workspace),
                                                 dtype=torch_dtype(prepared.dtype)).to(default_device())
    weights = {name: model.get_submodule(name).weight.detach() for name in traces}
    sensitivity = layer_sensitivities(traces, weights, CANDIDATE_BITS, method.group_size, method.sym)
    n_params = {name: t.n_params for name, t in traces.items()}
    bits = allocate_bits(sensitivity, n_params, method.budget, tie_groups_for(list(traces), method.tie))
    default_bits = max(set(bits.values()), key=list(bits.values()).count)
    return BitAllocation(
        key=context.key,
        bits=bits,
        default_bits=default_bits,
        dynamic=dynamic_map(bits, default_bits),
        avg_bits=average_bits(bits, n_params),
        sensitivity={name: {str(b): v for b, v in options.items()} for name, options in sensitivity.items()},
    )


STAGE = Stage("allocation", allocate, BitAllocation, libraries=("torch", "transformers", "scipy", "safetensors"),
              loads_model=True)
