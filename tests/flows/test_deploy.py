"""The deployable grid flow: JSON parameters, a subset of a grid's models, results in the workspace."""

from __future__ import annotations

import pytest

from qrobust.tasks.config import ConfigError
from qrobust.tasks.runtime.workspace import Workspace
from tests.flows.test_grid import _rows

GRID = """
name = "deployed"
[[models]]
name = "tiny-ar"
[[models]]
name = "tiny-diffusion"
[[pairs]]
diffusion = "tiny-diffusion"
ar = "tiny-ar"
[[methods]]
name = "fp"
[[benchmarks]]
name = "humaneval"
limit = 1
[generation]
max_new_tokens = 8
steps = 4
"""


@pytest.mark.slow
def test_a_deployment_run_for_one_model_runs_only_its_cells_in_the_workspace(tmp_path):
    from qrobust.flows.deploy import grid_deployment

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID)
    workspace = Workspace.at(tmp_path / "workspace")
    summary = grid_deployment(grid=str(grid_file), workspace=str(workspace.root), models=["tiny-ar"])
    assert summary["done"] == 1 and summary["failed"] == 0
    assert _rows(workspace, "SELECT model FROM results") == [("tiny-ar",)]
    assert _rows(workspace, "SELECT * FROM pairs") == [("tiny-diffusion", "tiny-ar")]
    # the stages' artifacts live in the workspace even though the grid ran inside another flow
    assert list((workspace.root / "artifacts" / "generate").iterdir())


def test_a_deployment_run_for_a_model_not_in_the_grid_is_refused(tmp_path):
    from qrobust.flows.deploy import grid_deployment

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID)
    with pytest.raises(ConfigError, match="model 'llama' is not in grid 'deployed'"):
        grid_deployment.fn(grid=str(grid_file), workspace=str(tmp_path / "workspace"), models=["llama"])
