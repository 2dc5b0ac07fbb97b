"""The grid as a Prefect deployment: for sites that schedule work through Prefect work pools.

Deployment parameters are JSON, so this flow takes a grid by file or bundled name and a
workspace path. Each flow run runs on one worker; with one worker per GPU (each started with
its own CUDA_VISIBLE_DEVICES and `--limit 1`), runs for different models of a grid go to
different GPUs and write into the same workspace, whose store they share in turn. See the
README's "Scaling out" section for the commands.

    prefect deploy flows/deploy.py:grid_deployment --name grid --pool gpus
"""

from __future__ import annotations

import dataclasses

from prefect import flow


@flow(name="qrobust-grid-deployment", log_prints=False)
def grid_deployment(grid: str = "tiny", workspace: str | None = None, models: list[str] | None = None) -> dict:
    """Run (or resume) `grid` in `workspace`, only its `models` if given; returns {done, failed, seconds}."""
    from qrobust.flows.grid import run_grid
    from qrobust.tasks.config import ConfigError
    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.runtime.workspace import Workspace

    config = load_grid(grid)
    if models:
        unknown = sorted(set(models) - {m.name for m in config.models})
        if unknown:
            raise ConfigError(f"model {unknown[0]!r} is not in grid {config.name!r}")
        # pairs stay: they are declarations of the whole grid, written whole by every run
        config = dataclasses.replace(config, models=tuple(m for m in config.models if m.name in models))
    return run_grid(config, Workspace.at(workspace))
