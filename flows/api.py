"""The Python API's runner (`qrobust.run`): the same run as `qrobust run`, from a notebook."""

from __future__ import annotations


def run_grid_api(grid, workspace, runner: str = "threads", address: str | None = None,
                 recompute: tuple[str, ...] = (), report: bool = True, insecure: bool = False) -> dict:
    from qrobust.flows.grid import downstream_of, run_grid
    from qrobust.flows.runners import RunnerSpec
    from qrobust.tasks.config import GridConfig
    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.runtime.environment import set_library_environment
    from qrobust.tasks.runtime.workspace import Workspace

    set_library_environment()
    config = grid if isinstance(grid, GridConfig) else load_grid(str(grid))
    return run_grid(config, Workspace.at(workspace), RunnerSpec(runner, address),
                    recompute=downstream_of(set(recompute)), report=report, insecure=insecure)
