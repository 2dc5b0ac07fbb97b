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
-- the stage's cache key, the fingerprint of its code and its libraries' versions (JSON), and when it began
ALTER TABLE stage_events ADD COLUMN IF NOT EXISTS key VARCHAR;
ALTER TABLE stage_events ADD COLUMN IF NOT EXISTS code_hash VARCHAR;
ALTER TABLE stage_events ADD COLUMN IF NOT EXISTS versions VARCHAR;
ALTER TABLE stage_events ADD COLUMN IF NOT EXISTS started_at TIMESTAMP;
-- first-use costs of generation (kernel builds, autotuning), outside gen_seconds; the kernel it ran on
ALTER TABLE results ADD COLUMN IF NOT EXISTS warmup_seconds DOUBLE;
ALTER TABLE results ADD COLUMN IF NOT EXISTS kernel VARCHAR;
-- `qrobust bench`: the generation stage's speed on this machine against its floor, one row per cell and run
CREATE TABLE IF NOT EXISTS bench (
    recorded_at TIMESTAMP, cell VARCHAR, model VARCHAR, family VARCHAR, method VARCHAR, benchmark VARCHAR,
    device VARCHAR, dtype VARCHAR, kernel VARCHAR, batch_size INTEGER, problems INTEGER, gen_seconds DOUBLE,
    warmup_seconds DOUBLE, seconds_per_sample DOUBLE, tokens_per_s DOUBLE, floor DOUBLE, achieved DOUBLE,
    ratio DOUBLE, floor_kind VARCHAR, peak_mem_bytes BIGINT, stage_seconds VARCHAR
);
-- every code fingerprint a stage ran with: the modules it covers and each one's hash (JSON)
CREATE TABLE IF NOT EXISTS code_fingerprints (code_hash VARCHAR PRIMARY KEY, modules VARCHAR);
-- the cache key of every stage call a stored cell came from (JSON list of {stage, shard, key})
ALTER TABLE runs ADD COLUMN IF NOT EXISTS stage_keys VARCHAR;
-- where each cell's answers were generated and its checkpoint quantized (environments.environment_id;
-- several ids joined by commas when a cell's shards ran in different environments)
ALTER TABLE runs ADD COLUMN IF NOT EXISTS environment_id VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS quantize_environment_id VARCHAR;
CREATE TABLE IF NOT EXISTS environments (
    environment_id VARCHAR PRIMARY KEY, qrobust VARCHAR, git_commit VARCHAR, python VARCHAR, torch VARCHAR,
    transformers VARCHAR, gptqmodel VARCHAR, prefect VARCHAR, duckdb VARCHAR, device VARCHAR,
    cpu_capability VARCHAR, threads INTEGER, dtype VARCHAR, platform VARCHAR
);
-- how the cell's answers were generated and judged: row-independent, or coda-published
ALTER TABLE runs ADD COLUMN IF NOT EXISTS harness VARCHAR;
ALTER TABLE results ADD COLUMN IF NOT EXISTS harness VARCHAR;
-- scores the models' authors published, as the grid's presets and [[published]] tables give them
CREATE TABLE IF NOT EXISTS published_scores (
    model VARCHAR, benchmark VARCHAR, pass_at_1 DOUBLE, source VARCHAR, PRIMARY KEY (model, benchmark)
);
-- what each declared pair holds equal (tasks/pairs.py): one row per pair and attribute
CREATE TABLE IF NOT EXISTS pair_matching (
    diffusion_model VARCHAR, ar_model VARCHAR, attribute VARCHAR, diffusion_value VARCHAR, ar_value VARCHAR,
    verdict VARCHAR, attribute_order INTEGER, PRIMARY KEY (diffusion_model, ar_model, attribute)
);
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
        "bits": cell.method.columns["bits"],
        "budget": cell.method.columns["budget"],
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


def write_published_scores(con, scores) -> None:
    """Replace the published scores of the models a grid names (other models' rows stay)."""
    con.execute("BEGIN TRANSACTION")
    for model in sorted({score.model for score in scores}):
        con.execute("DELETE FROM published_scores WHERE model = ?", [model])
    _insert(con, "published_scores", [
        {"model": s.model, "benchmark": s.benchmark, "pass_at_1": s.pass_at_1, "source": s.source} for s in scores
    ])
    con.execute("COMMIT")


def write_pair_matching(con, facts) -> None:
    """Replace the pair-matching facts (`tasks.pairs.PairFact`s) with those of the latest run."""
    import dataclasses

    con.execute("BEGIN TRANSACTION")
    con.execute("DELETE FROM pair_matching")
    _insert(con, "pair_matching", [dataclasses.asdict(fact) for fact in facts])
    con.execute("COMMIT")


def write_cell(con, cell, run_record: dict, samples: list, result) -> None:
    """Replace everything stored for one cell, atomically.

    `samples` are `SampleRecord`s and `result` a `CellResult` (None for a failed cell), as the
    flow hands them over; `run_record` holds the cell's config, status, error, sandbox backend,
    stage keys and per-module bits.
    """
    import dataclasses

    base = _cell_columns(cell)
    run_row = {
        **base,
        "group_size": cell.method.columns["group_size"],
        "n_samples": cell.generation.n_samples,
        "config_json": json.dumps(run_record["config"], sort_keys=True, default=str),
        "config_hash": cell.cell_id,
        "status": run_record["status"],
        "error": run_record.get("error"),
        "sandbox": run_record.get("sandbox"),
        "finished_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "stage_keys": json.dumps(run_record.get("stage_keys") or [], sort_keys=True),
        "environment_id": _environment_ids(con, run_record.get("environments") or []),
        "quantize_environment_id": _environment_ids(con, [e for e in [run_record.get("quantize_environment")] if e]),
        "harness": cell.generation.harness,
    }
    sample_rows = [{**base, **dataclasses.asdict(sample), "sandbox": run_record.get("sandbox")} for sample in samples]
    con.execute("BEGIN TRANSACTION")
    try:
        for table in ("runs", "samples", "results", "layer_bits"):
            con.execute(f"DELETE FROM {table} WHERE cell_id = ?", [cell.cell_id])
        _insert(con, "runs", [run_row])
        _insert(con, "samples", sample_rows)
        if result is not None:
            _insert(con, "results", [{**base, **dataclasses.asdict(result), "harness": cell.generation.harness}])
        module_bits = run_record.get("module_bits") or {}
        _insert(con, "layer_bits", [{"cell_id": cell.cell_id, "module": m, "bits": b} for m, b in module_bits.items()])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def _environment_ids(con, records: list[dict]) -> str | None:
    """Store each environment record once; the ids of `records`, joined by commas."""
    from qrobust.tasks.runtime.provenance import environment_id

    ids = []
    for record in records:
        ids.append(environment_id(record))
        columns = ["environment_id", *record]
        con.execute(f"INSERT OR IGNORE INTO environments ({', '.join(columns)}) VALUES "
                    f"({', '.join('?' for _ in columns)})", [ids[-1], *record.values()])
    return ",".join(sorted(set(ids))) or None


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
                 error: str | None = None, placement: dict | None = None, key: str | None = None, code=None,
                 versions: dict | None = None, started_at: float | None = None) -> None:
    """One row of `stage_events`; `code` (a CodeFingerprint) is also kept in `code_fingerprints`."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    _insert(con, "stage_events", [{
        "cell_id": cell_id, "stage": stage, "shard": shard, "state": state, "seconds": seconds,
        "error": error, "recorded_at": now,
        "placement": json.dumps(placement, sort_keys=True) if placement else None,
        "key": key, "code_hash": code.digest if code else None,
        "versions": json.dumps(versions, sort_keys=True) if versions else None,
        "started_at": datetime.fromtimestamp(started_at, timezone.utc).replace(tzinfo=None) if started_at else None,
    }])
    if code is not None:
        con.execute("INSERT OR IGNORE INTO code_fingerprints VALUES (?, ?)",
                    [code.digest, json.dumps(dict(code.modules), sort_keys=True)])


def write_bench_rows(con, rows: list) -> None:
    """Append `qrobust bench` rows (BenchRow)."""
    import dataclasses

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    _insert(con, "bench", [{"recorded_at": now, **dataclasses.asdict(row),
                            "stage_seconds": json.dumps(row.stage_seconds, sort_keys=True)} for row in rows])


def content_digest(con) -> str:
    """A hash of everything the report is made from (the stored cells, their samples and the
    per-layer tables), so that an unchanged store makes the same report."""
    import hashlib

    digest = hashlib.sha256()
    present = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table, exclude in (("runs", "EXCLUDE (finished_at)"), ("samples", ""), ("results", ""), ("pairs", ""),
                           ("pair_matching", ""), ("layer_sensitivity", ""), ("layer_bits", ""),
                           ("published_scores", "")):
        # a store written before a table existed is read as it is
        rows = con.execute(f"SELECT * {exclude} FROM {table} ORDER BY ALL").fetchall() if table in present else []
        digest.update(f"{table}:{rows!r}".encode())
    return digest.hexdigest()[:20]


def read_table(path: Path, table: str):
    """A table or view of the store as a pandas DataFrame."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
        raise ValueError(f"table {table!r} is not a table name")
    return query(path, f"SELECT * FROM {table}")


def query(path: Path, sql: str):
    """Run a read-only query; returns a pandas DataFrame."""
    with connect(path, read_only=True) as con:
        return con.execute(sql).df()
