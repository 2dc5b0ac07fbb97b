"""The `qrobust` command line. Heavy libraries are imported only by the command that runs."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrobust",
        description="Quantization robustness of auto-regressive and diffusion language models on code benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"qrobust {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_workspace(p):
        p.add_argument("--workspace", default=None, help="workspace directory (default: ./qrobust-workspace)")
        return p

    run = with_workspace(sub.add_parser("run", help="run or resume a grid (default: the bundled tiny grid)"))
    run.add_argument("grid", nargs="?", default=None, help="a grid TOML file or a bundled grid name")
    run.add_argument("--dry-run", action="store_true", help="list the grid's cells with their settings and stop")
    run.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    run.add_argument("--runner", choices=("threads", "ray"), default="threads",
                     help="threads: this process (default); ray: a Ray cluster, GPU stages one per GPU")
    run.add_argument("--address", default=None,
                     help="the Ray cluster to join (host:port, ray://host:10001 or auto; default: start a local one)")
    run.add_argument("--recompute", action="append", default=[], metavar="STAGE",
                     help="compute STAGE again even where its cached result is current, and every stage after it "
                          "(prepare-model, calibration, hessian, allocation, quantize, generate, execute, report); "
                          "may be repeated")

    status = with_workspace(sub.add_parser("status", help="which cells and stages are done, cached or failed"))
    status.add_argument("grid", nargs="?", default=None, help="also list this grid's cells that have not run")

    sql = with_workspace(sub.add_parser("sql", help="query the results store"))
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    sql.add_argument("--out", default=None, help="file to write (required for parquet)")

    with_workspace(sub.add_parser("report", help="write report.md and report.html from the store"))

    export = with_workspace(sub.add_parser("export", help="write every table of the store to Parquet"))
    export.add_argument("--out", default=None, help="directory (default: WORKSPACE/export)")

    evaluate = sub.add_parser("evaluate", help="score a JSONL of samples from any generator in the sandbox")
    evaluate.add_argument("samples")
    evaluate.add_argument("--benchmark", choices=("humaneval", "mbpp"), required=True)
    evaluate.add_argument("--mbpp-path", default=None, help="MBPP problems as JSONL (default: the hub)")
    evaluate.add_argument("--sandbox", choices=("auto", "docker", "bwrap", "none"), default="auto")
    evaluate.add_argument("--style", choices=("completion", "chat", "coda-instruct"), default="completion")
    evaluate.add_argument("--timeout", type=float, default=10.0, help="seconds per sample")
    evaluate.add_argument("--out", default=None, help="write one verdict per sample as JSONL")
    return parser


def _version() -> str:
    from qrobust import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from qrobust.tasks.runtime.environment import set_library_environment

    set_library_environment()
    from qrobust.tasks.config import ConfigError
    from qrobust.tasks.storage.store import StoreBusy

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError, StoreBusy) as exc:
        print(f"qrobust: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("qrobust: interrupted; run the same command again to resume from cache", file=sys.stderr)
        return 130


def cmd_run(args) -> int:
    from rich.console import Console

    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.runtime.workspace import Workspace

    grid = load_grid(args.grid)
    console = Console(stderr=True)
    if args.dry_run:
        _print_cells(grid, Console(stderr=True, width=max(console.width, 200)))
        return 0
    from qrobust.flows.grid import downstream_of, run_grid
    from qrobust.flows.runners import RunnerSpec

    runner = RunnerSpec(args.runner, args.address)
    recompute = downstream_of(set(args.recompute))
    _check_sandbox(grid)
    workspace = Workspace.at(args.workspace)
    summary = run_grid(grid, workspace, runner, recompute=recompute, report=not args.no_report)
    console.print(
        f"grid {grid.name!r}: {summary['done']} cells done, {summary['failed']} failed "
        f"in {summary['seconds']:.1f}s; store: {workspace.store_path}"
        + (f"; details of failures in {workspace.logs / 'prefect.log'}" if summary["failed"] else "")
    )
    if summary["report"]:
        print(f"report: {summary['report']['html']}")
    return 1 if summary["failed"] else 0


def _check_sandbox(grid) -> None:
    """Fail before any model work if the configured sandbox cannot run."""
    from qrobust.sandbox import SandboxUnavailable, resolve_backend

    try:
        resolve_backend(grid.sandbox.backend)
    except SandboxUnavailable as exc:
        raise ValueError(str(exc)) from None


def _print_cells(grid, console) -> None:
    from rich.table import Table

    table = Table(title=f"grid {grid.name}: {len(grid.cells())} cells")
    for column in ("cell", "model", "family", "method", "benchmark", "problems", "prompt", "settings"):
        table.add_column(column)
    for cell in grid.cells():
        b = cell.benchmark
        problems = str(len(b.task_ids) if b.task_ids else b.limit or "all")
        table.add_row(cell.cell_id, cell.model.name, cell.model.family, cell.method.label, b.name, problems,
                      cell.model.prompt_style, generation_settings(cell))
    console.print(table)


def generation_settings(cell) -> str:
    """The decoding settings a cell runs with, those of its model's family only."""
    g = cell.generation
    settings = [f"max_new_tokens={g.max_new_tokens}", f"temperature={g.temperature}", f"top_p={g.top_p}"]
    if g.top_k is not None:
        settings.append(f"top_k={g.top_k}")
    if cell.model.family == "diffusion":
        settings += [f"steps={g.steps}", f"alg={g.alg}", f"alg_temp={g.alg_temp}", f"eps={g.eps}",
                     f"block_length={g.block_length}"]
        for name in ("suppressed_tokens", "confidence_excluded_tokens"):
            if getattr(g, name):
                settings.append(f"{name}={','.join(getattr(g, name))}")
    settings += [f"n_samples={g.n_samples}", f"seed={g.seed}", f"dtype={cell.model.dtype}", f"weights={g.weights}"]
    return " ".join(settings)


def cmd_report(args) -> int:
    from qrobust.tasks.runtime.workspace import Workspace
    from qrobust.tasks.stages.report import write_workspace_report
    from qrobust.tasks.storage.store import Store

    workspace = Workspace.existing(args.workspace)
    if not workspace.store_path.exists():
        raise FileNotFoundError(f"no results store at {workspace.store_path}; run `qrobust run` first")
    paths = write_workspace_report(workspace, Store(workspace.store_path))
    print(f"report: {paths['html']}\nmarkdown: {paths['markdown']}")
    return 0


def cmd_status(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from qrobust.tasks.runtime.workspace import Workspace
    from qrobust.tasks.storage.store import query

    workspace = Workspace.existing(args.workspace)
    runs = query(workspace.store_path, """
        WITH latest AS (
            SELECT cell_id, shard, arg_max(state, recorded_at) AS state
            FROM stage_events WHERE stage = 'generate' GROUP BY cell_id, shard)
        SELECT r.cell_id, r.model, r.method, coalesce(CAST(r.bits AS VARCHAR), CAST(r.budget AS VARCHAR), '') AS size,
               r.benchmark, r.status, r.error,
               (SELECT string_agg(DISTINCT l.state, ', ') FROM latest l WHERE l.cell_id = r.cell_id) AS shards,
               res.pass_at_1
        FROM runs r LEFT JOIN results res USING (cell_id)
        ORDER BY r.model, r.benchmark, r.method, size""")
    plans = freshness = None
    if args.grid:
        from qrobust.flows.grid import cell_freshness, plan_grid
        from qrobust.tasks.grid_file import load_grid

        plans = plan_grid(load_grid(args.grid))
        freshness = cell_freshness(plans, workspace.store_path)
        in_grid = {p.cell.cell_id for p in plans}
        runs = runs[runs["cell_id"].isin(in_grid)]
    table = Table(title=f"cells in {workspace.store_path}")
    columns = ["cell", "model", "method", "bits/budget", "benchmark", "status", "last shard states", "pass@1"]
    for column in (*columns, *(["cache"] if freshness is not None else []), "error"):
        table.add_column(column, overflow="fold")
    for row in runs.itertuples(index=False):
        pass_at_1 = "" if row.pass_at_1 != row.pass_at_1 or row.pass_at_1 is None else f"{row.pass_at_1:.3f}"
        cache = [freshness.get(row.cell_id, "")] if freshness is not None else []
        table.add_row(row.cell_id[:8], row.model, row.method, row.size, row.benchmark, row.status,
                      row.shards or "", pass_at_1, *cache, (row.error or "")[:120])
    if plans is not None:
        done = set(runs["cell_id"])
        for plan in plans:
            cell = plan.cell
            if cell.cell_id not in done:
                size = cell.method.columns["bits"] or cell.method.columns["budget"] or ""
                table.add_row(cell.cell_id[:8], cell.model.name, cell.method.name, str(size), cell.benchmark.name,
                              "pending", "", "", "", "")
    Console(width=200).print(table)
    if freshness is not None:
        stale = sum(value.startswith("stale") for value in freshness.values())
        print(f"{stale} of {len(freshness)} stored cells are stale: `qrobust run {args.grid}` recomputes what changed")
    return 0


def cmd_sql(args) -> int:
    from qrobust.tasks.storage.store import query
    from qrobust.tasks.runtime.workspace import Workspace

    import duckdb

    try:
        df = query(Workspace.at(args.workspace).store_path, args.query)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {str(exc).splitlines()[0]}") from None
    if args.format == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for column in df.columns:
            table.add_column(str(column))
        for row in df.itertuples(index=False):
            table.add_row(*("" if v is None else str(v) for v in row))
        Console(width=200).print(table)
    elif args.format == "csv":
        _emit(df.to_csv(index=False), args.out)
    elif args.format == "json":
        _emit(df.to_json(orient="records", lines=True), args.out)
    else:
        if not args.out:
            raise ValueError("--format parquet needs --out FILE")
        df.to_parquet(args.out, index=False)
        print(f"wrote {len(df)} rows to {args.out}")
    return 0


def _emit(text: str, out: str | None) -> None:
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)


def cmd_export(args) -> int:
    from pathlib import Path

    from qrobust.tasks.storage.store import connect
    from qrobust.tasks.runtime.workspace import Workspace

    workspace = Workspace.at(args.workspace)
    out = Path(args.out or workspace.root / "export")
    out.mkdir(parents=True, exist_ok=True)
    with connect(workspace.store_path, read_only=True) as con:
        tables = [row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for name in tables:
            con.execute(f"COPY (SELECT * FROM {name}) TO '{out / name}.parquet' (FORMAT parquet)")
    print(f"exported {len(tables)} tables to {out}")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from qrobust.tasks.config import BenchmarkSpec, SandboxSpec
    from qrobust.tasks.stages.execute import evaluate_sample_file
    from qrobust.tasks.numerics.stats import pass_at_k_table

    spec = BenchmarkSpec(name=args.benchmark, path=args.mbpp_path)
    backend, verdicts = evaluate_sample_file(
        args.samples, spec, SandboxSpec(backend=args.sandbox, timeout_s=args.timeout), style=args.style
    )
    if args.out:
        with open(args.out, "w") as out:
            for verdict in verdicts:
                out.write(json.dumps({**verdict, "sandbox": backend}) + "\n")
    for k, estimate in pass_at_k_table(verdicts).items():
        print(f"pass@{k}: {estimate:.4f}")
    print(f"{len(verdicts)} samples judged in the {backend} sandbox")
    return 0


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "sql": cmd_sql,
    "report": cmd_report,
    "export": cmd_export,
    "evaluate": cmd_evaluate,
}

if __name__ == "__main__":
    sys.exit(main())
