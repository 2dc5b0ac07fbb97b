"""End to end: the bundled pairs-tiny grid (a Dream-format and a LLaDA-format model beside an AR
twin) through the flow: conversion, full precision and GPTQ cells, sandboxed answers, the pair
facts and the report."""

from __future__ import annotations

import json

import pytest

from qrobust.tasks.grid_file import load_grid
from qrobust.tasks.runtime.workspace import Workspace
from qrobust.tasks.storage.store import query
from tests.conftest import require_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from qrobust.flows.grid import run_grid

    workspace = Workspace.at(tmp_path_factory.mktemp("pairs-tiny"))
    grid = load_grid("pairs-tiny")
    return grid, workspace, run_grid(grid, workspace)


def test_every_cell_of_each_new_architecture_runs_at_full_precision_and_gptq(finished):
    grid, workspace, summary = finished
    assert summary == {**summary, "done": len(grid.cells()), "failed": 0}
    rows = query(workspace.store_path, "SELECT model, method, count(*) AS cells FROM results GROUP BY ALL ORDER BY ALL")
    assert rows.values.tolist() == [[model, method, 2] for model in ("tiny-dream", "tiny-llada", "tiny-twin")
                                    for method in ("fp", "gptq")]


def test_answers_were_judged_in_a_sandbox(finished):
    _, workspace, _ = finished
    sandboxes = set(query(workspace.store_path, "SELECT DISTINCT sandbox FROM samples")["sandbox"])
    require_or_skip(sandboxes <= {"docker", "bwrap"}, f"no isolating sandbox here (ran with {sorted(sandboxes)})")
    assert len(query(workspace.store_path, "SELECT * FROM samples")) == 12


def test_the_diffusion_stand_ins_were_converted_from_their_own_formats(finished):
    _, workspace, _ = finished
    from qrobust.tasks.artifacts import PreparedModel, read_manifest

    prepared = {m.name: m for m in (read_manifest(d, PreparedModel)
                                    for d in (workspace.root / "artifacts" / "prepare-model").iterdir())}
    assert (prepared["tiny-dream"].conversion["converted_from"], prepared["tiny-dream"].logits_shift) == ("Dream", True)
    assert (prepared["tiny-llada"].conversion["converted_from"], prepared["tiny-llada"].logits_shift) == ("LLaDA", False)


def test_llada_ran_with_its_per_benchmark_eos_settings(finished):
    _, workspace, _ = finished
    rows = query(workspace.store_path, "SELECT benchmark, config_json FROM runs WHERE model = 'tiny-llada' AND method = 'fp'")
    generation = {r.benchmark: json.loads(r.config_json)["cell"]["generation"] for r in rows.itertuples(index=False)}
    assert generation["humaneval"]["suppressed_tokens"] == ["<|endoftext|>"]
    assert generation["mbpp"]["confidence_excluded_tokens"] == ["<|endoftext|>", "<|eot_id|>"]
    assert generation["mbpp"]["block_length"] == 16 and generation["mbpp"]["alg"] == "maskgit_plus"


def test_the_store_records_what_each_pair_holds_equal_with_parameters_counted(finished):
    _, workspace, _ = finished
    facts = query(workspace.store_path, "SELECT * FROM pair_matching WHERE diffusion_model = 'tiny-llada'")
    by_attribute = {r.attribute: r for r in facts.itertuples(index=False)}
    assert by_attribute["prompt format"].verdict == "same"
    parameters = by_attribute["parameters"]
    assert parameters.verdict == "differs"  # a Llama layout without q/k norms beside a Qwen3 one
    assert int(parameters.diffusion_value.replace(",", "")) > 0 and int(parameters.ar_value.replace(",", "")) > 0


def test_the_report_shows_the_pair_facts_beside_the_claim(finished):
    _, workspace, summary = finished
    report = (workspace.report_dir / "report.md").read_text()
    claim = report.split("## claim:")[1]
    assert "- **tiny-llada** against **tiny-twin**: same: " in claim
    assert "| tiny-dream | tiny-twin | backbone |" in claim
