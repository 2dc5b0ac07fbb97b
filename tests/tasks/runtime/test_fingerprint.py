"""A stage's code is its module and what that imports: no more, so that an edit reruns only its stages."""

from __future__ import annotations

import pytest

from qrobust.flows.grid import plan_grid
from qrobust.tasks.grid_file import parse_grid
from qrobust.tasks.runtime.fingerprint import module_closure
from tests.flows.test_grid import GRID


@pytest.fixture(scope="module")
def calls():
    plans = plan_grid(parse_grid(GRID.format(bits=4)))
    return {(c.stage.name, c.subject.split("/")[0]): c for p in plans for c in p.calls}


def _modules(call) -> set[str]:
    return {name for name, _ in call.stage.code(call.planned_inputs).modules}


def test_no_stage_covers_the_flows_the_report_or_the_package_root(calls):
    for call in calls.values():
        modules = _modules(call)
        assert not {m for m in modules if m.startswith("qrobust.flows")}, call.stage.name
        assert "qrobust" not in modules and "qrobust.tasks.storage.report" not in modules


def test_quantization_does_not_cover_generation_and_generation_not_quantization(calls):
    quantize = next(c for (stage, _), c in calls.items() if stage == "quantize")
    generate = next(c for (stage, _), c in calls.items() if stage == "generate")
    assert "qrobust.tasks.stages.generate" not in _modules(quantize)
    assert not {m for m in _modules(quantize) if m.startswith("qrobust.tasks.decoding")}
    assert "qrobust.tasks.stages.quantize" not in _modules(generate)


def test_a_shard_covers_its_own_familys_decoder_only(calls):
    by_family = {c.inputs[3]: _modules(c) for (stage, _), c in calls.items() if stage == "generate"}
    assert "qrobust.tasks.decoding.ar" in by_family["ar"] and "qrobust.tasks.decoding.diffusion" not in by_family["ar"]
    assert "qrobust.tasks.decoding.diffusion" in by_family["diffusion"]
    assert "qrobust.tasks.decoding.ar" not in by_family["diffusion"]


def test_a_stage_that_reaches_the_flows_is_refused():
    with pytest.raises(ImportError, match="stage code must not import flows"):
        module_closure(("qrobust.flows.api",))
