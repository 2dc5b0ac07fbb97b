"""qrobust: how much accuracy does a language model lose when it is post-training quantized?

The Python API beside the command line, for notebooks and scripts:

    import qrobust
    summary = qrobust.run("tiny", workspace="ws")     # run or resume a grid (a name, a path or a GridConfig)
    df = qrobust.results("ws")                          # the `results` table as a pandas DataFrame
    con = qrobust.connect("ws")                         # a read-only DuckDB connection to the whole store

In a checkout the subpackages live at the repository's top level (`flows/`, `tasks/`,
`sandbox/`, `tools/`, `data/`, `docker/`); installed, they are `qrobust.flows`, `qrobust.tasks`, ...
Nothing heavy is imported until a function needs it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version
from pathlib import Path as _Path

# A source checkout keeps the subpackages beside this folder (the design card's layout): search
# there too, so that any checkout (a copy, a second worktree) imports its own code. A wheel has
# them inside this folder and no pyproject.toml beside it.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "tasks" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

try:
    __version__ = _version("qrobust")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "connect", "results", "run"]


def run(grid="tiny", workspace=None, *, runner: str = "threads", address: str | None = None,
        recompute: tuple[str, ...] = (), report: bool = True, insecure: bool = False) -> dict:
    """Run (or resume) a grid; returns {done, failed, seconds, report}.

    `grid` is a bundled grid name, a TOML path or a parsed `GridConfig`; `workspace` a directory
    (default ./qrobust-workspace). Cached stages are reused; `recompute` names stages to force.
    `insecure` goes on with a Ray cluster or Prefect API that others could use (`qrobust run --insecure`).
    """
    from qrobust.flows.api import run_grid_api

    return run_grid_api(grid, workspace, runner=runner, address=address, recompute=recompute, report=report,
                        insecure=insecure)


def results(workspace=None, table: str = "results"):
    """A table (default `results`) or view of a workspace's store as a pandas DataFrame."""
    from qrobust.tasks.runtime.workspace import Workspace
    from qrobust.tasks.storage.store import read_table

    return read_table(Workspace.existing(workspace).store_path, table)


def connect(workspace=None):
    """A read-only DuckDB connection to a workspace's store (close it when done: a run waits for it)."""
    import duckdb

    from qrobust.tasks.runtime.workspace import Workspace

    path = Workspace.existing(workspace).store_path
    if not path.exists():
        raise FileNotFoundError(f"no results store at {path}; run qrobust.run() first")
    return duckdb.connect(str(path), read_only=True)
