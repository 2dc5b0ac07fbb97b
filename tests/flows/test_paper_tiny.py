"""End to end: the bundled paper-tiny grid (the study's presets on tiny stand-ins) through the flow."""

from __future__ import annotations

import json

import pytest

from qrobust.tasks.grid_file import load_grid
from qrobust.tasks.storage.store import query
from qrobust.tasks.runtime.workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from qrobust.flows.grid import run_grid

    workspace = Workspace.at(tmp_path_factory.mktemp("paper-tiny"))
    grid = load_grid("paper-tiny")
    return grid, workspace, run_grid(grid, workspace)


def _configs(workspace) -> dict[tuple[str, str, str], dict]:
    rows = query(workspace.store_path, "SELECT model, method, benchmark, config_json FROM runs")
    return {(r.model, r.method, r.benchmark): json.loads(r.config_json) for r in rows.itertuples(index=False)}


def test_every_cell_of_the_study_grid_runs(finished):
    grid, workspace, summary = finished
    assert summary == {**summary, "done": len(grid.cells()), "failed": 0}
    counts = query(workspace.store_path, "SELECT model, count(*) AS cells FROM results GROUP BY model ORDER BY model")
    assert counts.values.tolist() == [["tiny-coda", 18], ["tiny-qwen3", 18]]


def test_each_model_ran_with_its_own_sampler_and_coda_instruct_prompts(finished):
    _, workspace, _ = finished
    configs = _configs(workspace)
    coda = configs[("tiny-coda", "gptq", "humaneval")]
    ar = configs[("tiny-qwen3", "gptq", "humaneval")]
    sampler = {key: coda["cell"]["generation"][key] for key in ("steps", "temperature", "top_p", "alg")}
    assert sampler == {"steps": 16, "temperature": 0.1, "top_p": 0.9, "alg": "entropy"}
    assert ar["cell"]["generation"]["temperature"] == 0.0
    for config in (coda, ar):
        assert config["format"]["style"] == "coda-instruct"
        assert config["format"]["generation_prefix"].startswith("Here is the completed function:")


def test_the_diffusion_stand_in_was_converted_from_codas_format(finished):
    _, workspace, _ = finished
    from qrobust.tasks.artifacts import PreparedModel, read_manifest

    prepared = [read_manifest(d, PreparedModel) for d in (workspace.root / "artifacts" / "prepare-model").iterdir()]
    [marker] = [model.conversion for model in prepared if model.name == "tiny-coda"]
    assert (marker["converted_from"], marker["mask_token_id"], marker["logits_shift"]) == ("CoDA", 2, True)


def test_answers_are_cut_at_the_formats_stop_strings(finished):
    _, workspace, _ = finished
    completions = query(workspace.store_path, "SELECT completion FROM samples")["completion"].tolist()
    assert len(completions) == 36 * 2
    assert not any("```" in c for c in completions)


def test_hawq_cells_stay_within_their_budgets(finished):
    _, workspace, _ = finished
    rows = query(workspace.store_path, "SELECT budget, avg_bits FROM results WHERE method = 'hawq'")
    assert len(rows) == 2 * 4 * 2
    assert all(avg <= budget + 1e-9 for budget, avg in rows.itertuples(index=False))
