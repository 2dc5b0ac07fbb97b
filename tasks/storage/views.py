"""SQL views over the DuckDB store: per-cell pass@k, degradation vs fp, and the claim.

Point estimates (pass rates, deltas, flip counts, pass@k) are computed in SQL
from ``samples``, so they are right whenever the views are read. Bootstrap
intervals and exact McNemar p-values are computed in Python
(:mod:`qrobust.tasks.numerics.stats`) by :func:`refresh_statistics` and stored in the tables
``cell_intervals``, ``degradation_stats`` and ``claim_stats``; the views join
them and show them only while they still describe the current samples
(column ``stats_current``; otherwise the interval columns are NULL until the
next refresh).

Which cells are compared
------------------------
- A cell is reported once it has a ``results`` row.
- A quantized cell (``method <> 'fp'``) is compared with the fp cell of the
  same model, benchmark, ``n_samples`` and harness, on the problems both have.
- A claim row pairs the quantized cells of a declared ``pairs`` row that share
  method, bits, budget and benchmark; it uses the problems all four cells
  (two quantized, two fp) have.
- A problem's binary outcome (flips, McNemar) is whether its first sample
  (lowest ``sample_idx``) passed; pass rates use all samples.
- ``min_detectable_drop`` is the smallest drop in pass@1 the comparison's design
  (its problems, each cell's samples per problem, the fp cell's pass rates) detects
  with 80% power at the 95% level (``stats.minimum_detectable_drop``): a delta
  smaller in size than it is one the design could easily miss.

Example queries
---------------
Accuracy lost per cell, worst first::

    SELECT model, method, bits, budget, benchmark,
           round(100 * delta_pass_at_1, 1) AS delta_pts,
           round(100 * delta_ci_low, 1) AS low, round(100 * delta_ci_high, 1) AS high,
           flips_pass_to_fail, flips_fail_to_pass, mcnemar_p
    FROM degradation
    ORDER BY delta_pass_at_1;

Does the diffusion model degrade less than its AR partner?::

    SELECT diffusion_model, ar_model, method, coalesce(bits::VARCHAR, 'budget ' || budget) AS setting,
           benchmark, difference, ci_low, ci_high, verdict
    FROM claim
    ORDER BY benchmark, method, bits, budget;

pass@k with its interval and the seed-to-seed spread of pass@1::

    SELECT model, method, bits, benchmark, k, estimate, ci_low, ci_high,
           seed_std, seed_min, seed_max
    FROM cell_pass_at_k
    WHERE k IN (1, 5, 10)
    ORDER BY model, method, bits, k;
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from qrobust.tasks.methods import BASELINE
from qrobust.tasks.numerics import stats

# Tolerance when checking that stored statistics still match the SQL point
# estimates: both sides average the same rates, in different orders.
_STALE_TOLERANCE = 1e-9

_STATS_TABLES = {
    "cell_intervals": """
        cell_id VARCHAR, k BIGINT, n_problems BIGINT, estimate DOUBLE,
        ci_low DOUBLE, ci_high DOUBLE, n_seeds BIGINT, seed_std DOUBLE,
        seed_min DOUBLE, seed_max DOUBLE, resamples BIGINT, bootstrap_seed BIGINT""",
    "degradation_stats": """
        cell_id VARCHAR, fp_cell_id VARCHAR, n_problems BIGINT, fp_pass_at_1 DOUBLE,
        pass_at_1 DOUBLE, delta_pass_at_1 DOUBLE, delta_ci_low DOUBLE,
        delta_ci_high DOUBLE, relative_degradation DOUBLE, flips_pass_to_fail BIGINT,
        flips_fail_to_pass BIGINT, mcnemar_p DOUBLE, resamples BIGINT, bootstrap_seed BIGINT,
        min_detectable_drop DOUBLE""",
    "claim_stats": """
        diffusion_cell_id VARCHAR, diffusion_fp_cell_id VARCHAR, ar_cell_id VARCHAR,
        ar_fp_cell_id VARCHAR, n_problems BIGINT, diffusion_delta DOUBLE, ar_delta DOUBLE,
        difference DOUBLE, ci_low DOUBLE, ci_high DOUBLE, verdict VARCHAR,
        resamples BIGINT, bootstrap_seed BIGINT""",
}

_VIEWS = {
    # One row per cell x problem: sample count, passing count, pass rate, first-sample outcome.
    "problem_outcomes": """
        SELECT cell_id, task_id,
               count(*) AS n,
               count(*) FILTER (WHERE coalesce(passed, false)) AS c,
               avg(coalesce(passed, false)::DOUBLE) AS pass_rate,
               arg_min(coalesce(passed, false), sample_idx) AS first_passed
        FROM samples
        GROUP BY cell_id, task_id""",
    # Each reported quantized cell with the fp cell it is compared against.
    "fp_baselines": f"""
        SELECT q.cell_id, f.cell_id AS fp_cell_id, q.model, q.family, q.method, q.bits,
               q.budget, q.avg_bits, q.benchmark
        FROM results q
        JOIN results f
          ON f.method = '{BASELINE}' AND f.model = q.model AND f.benchmark = q.benchmark
         AND f.n_samples IS NOT DISTINCT FROM q.n_samples
         AND f.harness IS NOT DISTINCT FROM q.harness
        WHERE q.method <> '{BASELINE}'""",
    # Per-problem paired outcomes of each quantized cell and its fp cell (common problems only).
    "degradation_problems": """
        SELECT b.cell_id, b.fp_cell_id, q.task_id,
               f.pass_rate AS fp_pass_rate, q.pass_rate,
               q.pass_rate - f.pass_rate AS delta,
               f.first_passed AS fp_first_passed, q.first_passed
        FROM fp_baselines b
        JOIN problem_outcomes q ON q.cell_id = b.cell_id
        JOIN problem_outcomes f ON f.cell_id = b.fp_cell_id AND f.task_id = q.task_id""",
    "degradation": f"""
        WITH point AS (
            SELECT cell_id, fp_cell_id, count(*) AS n_problems,
                   avg(fp_pass_rate) AS fp_pass_at_1, avg(pass_rate) AS pass_at_1,
                   count(*) FILTER (WHERE fp_first_passed AND NOT first_passed) AS flips_pass_to_fail,
                   count(*) FILTER (WHERE first_passed AND NOT fp_first_passed) AS flips_fail_to_pass
            FROM degradation_problems
            GROUP BY cell_id, fp_cell_id
        ), joined AS (
            SELECT b.*, p.n_problems, p.fp_pass_at_1, p.pass_at_1,
                   p.pass_at_1 - p.fp_pass_at_1 AS delta_pass_at_1,
                   p.flips_pass_to_fail, p.flips_fail_to_pass,
                   coalesce(s.n_problems = p.n_problems
                            AND s.flips_pass_to_fail = p.flips_pass_to_fail
                            AND s.flips_fail_to_pass = p.flips_fail_to_pass
                            AND abs(s.delta_pass_at_1 - (p.pass_at_1 - p.fp_pass_at_1)) <= {_STALE_TOLERANCE},
                            false) AS stats_current,
                   s.mcnemar_p, s.delta_ci_low, s.delta_ci_high, s.min_detectable_drop
            FROM fp_baselines b
            JOIN point p USING (cell_id, fp_cell_id)
            LEFT JOIN degradation_stats s USING (cell_id, fp_cell_id)
        )
        SELECT model, family, method, bits, budget, avg_bits, benchmark, n_problems,
               fp_pass_at_1, pass_at_1, delta_pass_at_1,
               delta_pass_at_1 / nullif(fp_pass_at_1, 0) AS relative_degradation,
               flips_pass_to_fail, flips_fail_to_pass,
               CASE WHEN stats_current THEN mcnemar_p END AS mcnemar_p,
               CASE WHEN stats_current THEN delta_ci_low END AS delta_ci_low,
               CASE WHEN stats_current THEN delta_ci_high END AS delta_ci_high,
               CASE WHEN stats_current THEN min_detectable_drop END AS min_detectable_drop,
               cell_id, fp_cell_id, stats_current
        FROM joined""",
    # Declared pairs x matching quantized settings (the four cells of each claim).
    "claim_cells": """
        SELECT p.diffusion_model, p.ar_model, d.method, d.bits, d.budget, d.benchmark,
               d.cell_id AS diffusion_cell_id, d.fp_cell_id AS diffusion_fp_cell_id,
               a.cell_id AS ar_cell_id, a.fp_cell_id AS ar_fp_cell_id
        FROM (SELECT DISTINCT diffusion_model, ar_model FROM pairs) p
        JOIN fp_baselines d ON d.model = p.diffusion_model
        JOIN fp_baselines a
          ON a.model = p.ar_model AND a.method = d.method AND a.benchmark = d.benchmark
         AND a.bits IS NOT DISTINCT FROM d.bits AND a.budget IS NOT DISTINCT FROM d.budget""",
    "claim": f"""
        WITH point AS (
            SELECT c.diffusion_cell_id, c.diffusion_fp_cell_id, c.ar_cell_id, c.ar_fp_cell_id,
                   count(*) AS n_problems,
                   avg(dp.delta) AS diffusion_delta, avg(ap.delta) AS ar_delta
            FROM claim_cells c
            JOIN degradation_problems dp
              ON dp.cell_id = c.diffusion_cell_id AND dp.fp_cell_id = c.diffusion_fp_cell_id
            JOIN degradation_problems ap
              ON ap.cell_id = c.ar_cell_id AND ap.fp_cell_id = c.ar_fp_cell_id
             AND ap.task_id = dp.task_id
            GROUP BY ALL
        ), joined AS (
            SELECT c.*, p.n_problems, p.diffusion_delta, p.ar_delta,
                   p.diffusion_delta - p.ar_delta AS difference,
                   coalesce(s.n_problems = p.n_problems
                            AND abs(s.difference - (p.diffusion_delta - p.ar_delta)) <= {_STALE_TOLERANCE},
                            false) AS stats_current,
                   s.ci_low, s.ci_high, s.verdict
            FROM claim_cells c
            JOIN point p USING (diffusion_cell_id, diffusion_fp_cell_id, ar_cell_id, ar_fp_cell_id)
            LEFT JOIN claim_stats s USING (diffusion_cell_id, diffusion_fp_cell_id, ar_cell_id, ar_fp_cell_id)
        )
        SELECT diffusion_model, ar_model, method, bits, budget, benchmark,
               diffusion_delta, ar_delta, difference,
               CASE WHEN stats_current THEN ci_low END AS ci_low,
               CASE WHEN stats_current THEN ci_high END AS ci_high,
               CASE WHEN stats_current THEN verdict END AS verdict,
               n_problems, diffusion_cell_id, diffusion_fp_cell_id, ar_cell_id, ar_fp_cell_id,
               stats_current
        FROM joined""",
    # pass@k for k = 1..(fewest samples of any problem), unbiased estimator via
    # log-gamma: C(n-c, k) / C(n, k) = exp(lgamma(n-c+1) - lgamma(n-c-k+1) - lgamma(n+1) + lgamma(n-k+1)).
    "cell_pass_at_k": f"""
        WITH cells AS (
            SELECT cell_id, min(n) AS max_k, count(*) AS n_problems
            FROM problem_outcomes GROUP BY cell_id
        ), ks AS (
            SELECT cell_id, n_problems, unnest(range(1, max_k + 1)) AS k FROM cells
        ), point AS (
            SELECT ks.cell_id, ks.k, ks.n_problems,
                   avg(CASE WHEN o.n - o.c < ks.k THEN 1.0
                            ELSE 1.0 - exp(lgamma(o.n - o.c + 1) - lgamma(greatest(o.n - o.c - ks.k + 1, 1))
                                           - lgamma(o.n + 1) + lgamma(o.n - ks.k + 1)) END) AS estimate
            FROM ks JOIN problem_outcomes o USING (cell_id)
            GROUP BY ks.cell_id, ks.k, ks.n_problems
        ), per_seed AS (
            SELECT cell_id, sample_idx, avg(coalesce(passed, false)::DOUBLE) AS pass_at_1
            FROM samples GROUP BY cell_id, sample_idx
        ), spread AS (
            SELECT cell_id, count(*) AS n_seeds, stddev_samp(pass_at_1) AS seed_std,
                   min(pass_at_1) AS seed_min, max(pass_at_1) AS seed_max
            FROM per_seed GROUP BY cell_id
        ), joined AS (
            SELECT p.*,
                   coalesce(s.n_problems = p.n_problems
                            AND abs(s.estimate - p.estimate) <= {_STALE_TOLERANCE}, false) AS stats_current,
                   s.ci_low, s.ci_high
            FROM point p
            LEFT JOIN cell_intervals s USING (cell_id, k)
        )
        SELECT r.model, r.family, r.method, r.bits, r.budget, r.avg_bits, r.benchmark,
               j.cell_id, j.k, j.n_problems, j.estimate,
               CASE WHEN j.stats_current THEN j.ci_low END AS ci_low,
               CASE WHEN j.stats_current THEN j.ci_high END AS ci_high,
               CASE WHEN j.k = 1 THEN sp.seed_std END AS seed_std,
               CASE WHEN j.k = 1 THEN sp.seed_min END AS seed_min,
               CASE WHEN j.k = 1 THEN sp.seed_max END AS seed_max,
               CASE WHEN j.k = 1 THEN sp.n_seeds END AS n_seeds,
               j.stats_current
        FROM results r
        JOIN joined j ON j.cell_id = r.cell_id
        JOIN spread sp ON sp.cell_id = r.cell_id""",
}


def create_views(con) -> None:
    """Create (or replace) every view, and the statistics tables if they are missing.

    Needs the store tables samples, results and pairs. Idempotent; existing
    statistics are kept.
    """
    for name, columns in _STATS_TABLES.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
        for column in columns.split(","):  # a table from before a column was added gains it
            con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column.strip()}")
    for name, query in _VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {query}")


def refresh_statistics(con, resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED) -> dict:
    """Recompute bootstrap intervals and McNemar tests from samples, then (re)create the views.

    Replaces the contents of cell_intervals, degradation_stats and claim_stats
    in one transaction (never appends). Returns the row count of each table.
    """
    create_views(con)
    samples = con.sql(
        "SELECT cell_id, task_id, sample_idx, passed FROM samples "
        "WHERE cell_id IN (SELECT cell_id FROM results)"
    ).df()
    cells = {cell_id: frame for cell_id, frame in samples.groupby("cell_id", sort=True)}
    tables = {
        "cell_intervals": _cell_intervals(samples, resamples, seed),
        "degradation_stats": _degradation_stats(con, cells, resamples, seed),
        "claim_stats": _claim_stats(con, cells, resamples, seed),
    }
    _replace_tables(con, tables)
    return {name: len(frame) for name, frame in tables.items()}


def _provenance(resamples: int, seed: int) -> dict:
    return {"resamples": resamples, "bootstrap_seed": seed}


def _cell_intervals(samples: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    if samples.empty:
        return pd.DataFrame()
    return stats.cell_pass_at_k(samples, resamples=resamples, seed=seed).assign(**_provenance(resamples, seed))


def _degradation_stats(con, cells: dict, resamples: int, seed: int) -> pd.DataFrame:
    pairs = con.sql("SELECT cell_id, fp_cell_id FROM degradation ORDER BY cell_id, fp_cell_id").fetchall()
    return pd.DataFrame([
        {"cell_id": cell_id, "fp_cell_id": fp_cell_id,
         **asdict(stats.degradation(cells[fp_cell_id], cells[cell_id], resamples, seed)),
         **_provenance(resamples, seed)}
        for cell_id, fp_cell_id in pairs
    ])


def _claim_stats(con, cells: dict, resamples: int, seed: int) -> pd.DataFrame:
    keys = ["diffusion_cell_id", "diffusion_fp_cell_id", "ar_cell_id", "ar_fp_cell_id"]
    records = []
    for d_q, d_fp, a_q, a_fp in con.sql(f"SELECT {', '.join(keys)} FROM claim ORDER BY ALL").fetchall():
        result = stats.claim(cells[d_fp], cells[d_q], cells[a_fp], cells[a_q], resamples, seed)
        records.append({**dict(zip(keys, (d_q, d_fp, a_q, a_fp))), **asdict(result), **_provenance(resamples, seed)})
    return pd.DataFrame(records)


def _replace_tables(con, tables: dict) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for name, frame in tables.items():
            con.execute(f"CREATE OR REPLACE TABLE {name} ({_STATS_TABLES[name]})")
            if frame.empty:
                continue
            view_name = f"_incoming_{name}"
            con.register(view_name, frame)
            columns = ", ".join(_column_names(name))
            con.execute(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM {view_name}")
            con.unregister(view_name)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def _column_names(table: str) -> list[str]:
    return [spec.split()[0] for spec in _STATS_TABLES[table].split(",")]
