"""Report stage: report.md and report.html from the store, remade only when they would differ.

Its input is a digest of the store's content: the report is made again when a stored cell
changes or the report's own code (or a library it draws with) changes, and is otherwise
copied from its artifact. The workspace's `report/` folder always holds the latest one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from qrobust.tasks.artifacts import Report
from qrobust.tasks.runtime.stage import Stage, StageContext


@dataclass(frozen=True)
class StoreContent:
    """What the report is made from, by its digest (`tasks.storage.store.content_digest`)."""

    digest: str


def make_report(context: StageContext, content: StoreContent) -> Report:
    from qrobust.tasks.storage.report import write_report

    write_report(context.workspace.store_path, context.directory)
    files = tuple(sorted(p.name for p in context.directory.iterdir() if p.is_file()))
    return Report(key=context.key, files=files)


STAGE = Stage("report", make_report, Report, libraries=("duckdb", "pandas", "matplotlib", "numpy", "scipy"))


def write_workspace_report(workspace, store, recompute: bool = False) -> dict:
    """The report of `workspace`'s store in its `report/` folder (made, or reused); records the run."""
    from qrobust.tasks.storage.store import connect, content_digest, record_event

    with connect(workspace.store_path, read_only=True) as con:
        content = StoreContent(content_digest(con))
    report = STAGE.run(workspace, (content,), recompute=recompute)
    workspace.report_dir.mkdir(parents=True, exist_ok=True)
    for name in report.files:
        shutil.copy2(report.directory(workspace) / name, workspace.report_dir / name)
    state = "Cached" if report.run.cached else "Completed"
    store.write(record_event, "store", STAGE.name, state, seconds=report.run.seconds, key=report.key,
                code=STAGE.code((content,)), versions=STAGE.versions(), started_at=report.run.started_at)
    return {"markdown": str(workspace.report_dir / "report.md"), "html": str(workspace.report_dir / "report.html")}
