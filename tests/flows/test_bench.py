"""`qrobust bench`: the generation stage measured against the device's own floor, rows in the store."""

from __future__ import annotations

import json

import pytest

from qrobust.flows.cli import main
from qrobust.tasks.runtime.workspace import Workspace
from tests.flows.test_grid import GRID, _rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    grid = root / "grid.toml"
    grid.write_text(GRID.format(bits=4))
    workspace = Workspace.at(root / "workspace")
    return grid, workspace


def test_bench_appends_one_row_per_chosen_cell_with_speed_floor_and_stage_seconds(benched, capsys):
    grid, workspace = benched
    assert main(["bench", str(grid), "--workspace", str(workspace.root), "--problems", "2", "--estimate"]) == 0
    out = capsys.readouterr().out
    rows = _rows(workspace, "SELECT cell, family, kernel, problems, tokens_per_s, floor, achieved, ratio, "
                            "floor_kind, stage_seconds FROM bench ORDER BY cell")
    assert [r[0] for r in rows] == ["tiny-ar/fp/humaneval", "tiny-ar/gptq-w4g32/humaneval",
                                    "tiny-diffusion/fp/humaneval", "tiny-diffusion/gptq-w4g32/humaneval"]
    for cell, family, kernel, problems, tokens_per_s, floor, achieved, ratio, kind, stages in rows:
        assert problems == 2 and tokens_per_s > 0 and floor > 0 and achieved > 0
        assert ratio == pytest.approx(achieved / floor)
        assert ("tokens/s" in kind) == (family == "ar") and ("FLOP/s" in kind) == (family == "diffusion")
        assert (kernel == "dense") == ("/fp/" in cell)
        assert "generate" in json.loads(stages)
    assert "hours on" in out


def test_benching_does_not_touch_the_grid_cache_of_generation(benched):
    _, workspace = benched
    assert not (workspace.root / "artifacts" / "generate").exists()


def test_a_cell_filter_that_matches_nothing_is_a_one_line_error(benched, capsys):
    grid, workspace = benched
    assert main(["bench", str(grid), "--workspace", str(workspace.root), "--cell", "no-such-cell"]) == 2
    assert "no cell of grid 'e2e' matches 'no-such-cell'" in capsys.readouterr().err
