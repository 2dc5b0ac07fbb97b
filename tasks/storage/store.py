"""The DuckDB store: one file per workspace, written only by the flow's own process.

Writes are idempotent per cell: a cell's rows are replaced inside one transaction, so a
re-run, a resumed run or a run killed mid-write never leaves duplicate or partial rows.
Table and column names are fixed: users and scripts query them.

DuckDB lets one process at a time open the file for writing, and none may read it then. So
the file is opened only for one short piece of work at a time, under an inter-process lock
beside it (`results.duckdb.lock`): exclusive for writing, shared for reading. Two runs of a
grid on the same workspace, and queries or reports during a run, take turns.
"""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

# How long an open waits for other processes' turns with the store (a report holds a read
# turn while it renders; a run's statistics refresh holds a write turn) before giving up.
STORE_WAIT_S = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    cell_id VARCHAR PRIMARY KEY, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER,
    budget DOUBLE, group_size INTEGER, benchmark VARCHAR, n_samples INTEGER, config_json VARCHAR,
    config_hash VARCHAR, status VARCHAR, error VARCHAR, sandbox VARCHAR, finished_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS samples (
    cell_id VARCHAR, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER, budget DOUBLE,
    benchmark VARCHAR, task_id VARCHAR, sample_idx INTEGER, completion VARCHAR, passed BOOLEAN,
    status VARCHAR, error VARCHAR, gen_seconds DOUBLE, exec_seconds DOUBLE, sandbox VARCHAR,
    PRIMARY KEY (cell_id, task_id, sample_idx)
);
CREATE TABLE IF NOT EXISTS results (
    cell_id VARCHAR PRIMARY KEY, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER,
    budget DOUBLE, avg_bits DOUBLE, benchmark VARCHAR, n_problems INTEGER, n_samples INTEGER,
    pass_at_1 DOUBLE, model_bytes BIGINT, peak_mem_bytes BIGINT, gen_tokens_per_s DOUBLE,
    gen_seconds DOUBLE, quantize_seconds DOUBLE
);
CREATE TABLE IF NOT EXISTS pairs (diffusion_model VARCHAR, ar_model VARCHAR, PRIMARY KEY (diffusion_model, ar_model));
CREATE TABLE IF NOT EXISTS layer_sensitivity (
    model VARCHAR, layer INTEGER, module VARCHAR, n_params BIGINT, trace DOUBLE, trace_stderr DOUBLE,
    estimator VARCHAR, PRIMARY KEY (model, module, estimator)
);
CREATE TABLE IF NOT EXISTS layer_bits (cell_id VARCHAR, module VARCHAR, bits INTEGER, PRIMARY KEY (cell_id, module));
CREATE TABLE IF NOT EXISTS stage_events (
    cell_id VARCHAR, stage VARCHAR, shard INTEGER, state VARCHAR, seconds DOUBLE, error VARCHAR,
    recorded_at TIMESTAMP
);
-- where a Ray worker ran a stage (JSON: node, pid, resources, gpu_ids); NULL on the default runner
ALTER TABLE stage_events ADD COLUMN IF NOT EXISTS placement VARCHAR;
"""


class StoreBusy(RuntimeError):
    """Another process kept the store for longer than a caller will wait."""


@contextlib.contextmanager
def connect(path: Path, read_only: bool = False, wait_s: float = STORE_WAIT_S):
    """Open the store for one short piece of work, taking turns with other processes."""
    if read_only and not Path(path).exists():
        raise FileNotFoundError(f"no results store at {path}; run `qrobust run` first")
    deadline = time.monotonic() + wait_s
    with _store_turn(Path(path), exclusive=not read_only, deadline=deadline):
        con = _open(Path(path), read_only, deadline)
        try:
            if not read_only:
                con.execute(SCHEMA)
            yield con
        finally:
            con.close()


@contextlib.contextmanager
def _store_turn(path: Path, exclusive: bool, deadline: float):
    """Hold the store's inter-process lock; the OS drops it if the holder dies (even by kill -9)."""
    import fcntl

    if exclusive:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        if exclusive:
            raise
        yield  # a store read where no lock can be written (a read-only copy): no writer to wait for
        return
    with handle:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(f"results store {path} stayed locked by another process; try again later") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open(path: Path, read_only: bool, deadline: float):
    """Connect, retrying while a process outside the lock (the duckdb shell, say) holds the file."""
    import duckdb

    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StoreBusy(f"results store {path} is held by another process: {str(exc).splitlines()[0]}") from None
            time.sleep(0.2)


class Store:
    """The flow's writer: each write is one short transaction in its own turn with the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, writer, *args, **kwargs):
        """Call `writer(con, *args, **kwargs)` with the store open for writing."""
        with connect(self.path) as con:
            return writer(con, *args, **kwargs)


def _cell_columns(cell) -> dict:
    return {
        "cell_id": cell.cell_id,
        "model": cell.model.name,
        "family": cell.model.family,
        "method": cell.method.name,
        "bits": cell.method.bits,
        "budget": cell.method.budget,
        "benchmark": cell.benchmark.name,
    }


def _insert(con, table: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    placeholders = ", ".join("?" for _ in columns)
    con.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})",
        [[row[c] for c in columns] for row in rows],
    )


def write_pairs(con, pairs) -> None:
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM pairs")
    _insert(con, "pairs", [{"diffusion_model": p.diffusion, "ar_model": p.ar} for p in pairs])
    con.execute("COMMIT")


def write_cell(con, cell, run_record: dict, samples: list[dict], result: dict | None) -> None:
    """Replace everything stored for one cell, atomically."""
    base = _cell_columns(cell)
    run_row = {
        **base,
        "group_size": cell.method.group_size if cell.method.quantizes else None,
        "n_samples": cell.generation.n_samples,
        "config_json": json.dumps(run_record["config"], sort_keys=True, default=str),
        "config_hash": cell.cell_id,
        "status": run_record["status"],
        "error": run_record.get("error"),
        "sandbox": run_record.get("sandbox"),
        "finished_at": datetime.now(timezone.utc).replace(tzinfo=None),
    }
    sample_rows = [{**base, **sample, "sandbox": run_record.get("sandbox")} for sample in samples]
    con.execute("BEGIN TRANSACTION")
    try:
        for table in ("runs", "samples", "results", "layer_bits"):
            con.execute(f"DELETE FROM {table} WHERE cell_id = ?", [cell.cell_id])
        _insert(con, "runs", [run_row])
        _insert(con, "samples", sample_rows)
        if result is not None:
            _insert(con, "results", [{**base, **result}])
        module_bits = run_record.get("module_bits") or {}
        _insert(con, "layer_bits", [{"cell_id": cell.cell_id, "module": m, "bits": b} for m, b in module_bits.items()])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def write_layer_sensitivity(con, model: str, estimator: str, traces: dict[str, dict]) -> None:
    """Replace a model's per-layer traces for one estimator."""
    import re

    rows = [
        {"model": model, "layer": int(m.group(1)) if (m := re.search(r"layers\.(\d+)\.", name)) else None,
         "module": name, "n_params": t["n_params"], "trace": t["trace"], "trace_stderr": t["trace_stderr"],
         "estimator": estimator}
        for name, t in traces.items()
    ]
    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM layer_sensitivity WHERE model = ? AND estimator = ?", [model, estimator])
    _insert(con, "layer_sensitivity", rows)
    con.execute("COMMIT")


def record_event(con, cell_id: str, stage: str, state: str, seconds: float = 0.0, shard: int | None = None,
                 error: str | None = None, placement: dict | None = None) -> None:
    _insert(con, "stage_events", [{
        "cell_id": cell_id, "stage": stage, "shard": shard, "state": state, "seconds": seconds,
        "error": error, "recorded_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "placement": json.dumps(placement, sort_keys=True) if placement else None,
    }])


def query(path: Path, sql: str):
    """Run a read-only query; returns a pandas DataFrame."""
    with connect(path, read_only=True) as con:
        return con.execute(sql).df()


def assemble_cell(checkpoint: dict, generations: list[dict], verdict_manifests: list[dict]) -> tuple[list[dict], dict]:
    """The sample rows and the result row of a finished cell."""
    from qrobust.tasks.stages.execute import read_verdicts
    from qrobust.tasks.stages.generate import read_completions

    samples = []
    for generation, verdicts in zip(generations, verdict_manifests):
        by_key = {(v["task_id"], v["sample_idx"]): v for v in read_verdicts(verdicts)}
        for record in read_completions(generation):
            verdict = by_key[(record["task_id"], record["sample_idx"])]
            samples.append({
                "task_id": record["task_id"],
                "sample_idx": record["sample_idx"],
                "completion": record["completion"],
                "passed": verdict["passed"],
                "status": verdict["status"],
                "error": verdict["error"] or None,
                "gen_seconds": record["gen_seconds"],
                "exec_seconds": verdict["exec_seconds"],
            })
    per_problem: dict[str, list[bool]] = {}
    for sample in samples:
        per_problem.setdefault(sample["task_id"], []).append(sample["passed"])
    gen_seconds = sum(g["gen_seconds"] for g in generations)
    gen_tokens = sum(g["gen_tokens"] for g in generations)
    result = {
        "avg_bits": checkpoint.get("avg_bits"),
        "n_problems": len(per_problem),
        "n_samples": max((len(v) for v in per_problem.values()), default=0),
        "pass_at_1": sum(sum(v) / len(v) for v in per_problem.values()) / max(len(per_problem), 1),
        "model_bytes": max((g["model_bytes"] for g in generations), default=None),
        "peak_mem_bytes": max((g["peak_mem_bytes"] for g in generations), default=None),
        "gen_tokens_per_s": gen_tokens / gen_seconds if gen_seconds else None,
        "gen_seconds": gen_seconds,
        "quantize_seconds": checkpoint.get("quantize_seconds"),
    }
    return samples, result
