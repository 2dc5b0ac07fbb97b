import math
import re

import duckdb
import numpy as np
import pandas as pd
import pytest

from qrobust.tasks.numerics import stats
from qrobust.tasks.storage import views

RESAMPLES = 300

STORE_TABLES = """
CREATE TABLE runs (cell_id VARCHAR, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER,
    budget DOUBLE, group_size INTEGER, benchmark VARCHAR, n_samples INTEGER, config_json VARCHAR,
    config_hash VARCHAR, status VARCHAR, error VARCHAR, sandbox VARCHAR, finished_at TIMESTAMP);
CREATE TABLE samples (cell_id VARCHAR, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER,
    budget DOUBLE, benchmark VARCHAR, task_id VARCHAR, sample_idx INTEGER, completion VARCHAR,
    passed BOOLEAN, status VARCHAR, error VARCHAR, gen_seconds DOUBLE, exec_seconds DOUBLE,
    sandbox VARCHAR);
CREATE TABLE results (cell_id VARCHAR, model VARCHAR, family VARCHAR, method VARCHAR, bits INTEGER,
    budget DOUBLE, avg_bits DOUBLE, benchmark VARCHAR, n_problems INTEGER, n_samples INTEGER,
    pass_at_1 DOUBLE, model_bytes BIGINT, peak_mem_bytes BIGINT, gen_tokens_per_s DOUBLE, harness VARCHAR);
CREATE TABLE pairs (diffusion_model VARCHAR, ar_model VARCHAR);
"""

FAMILY = {"coda": "diffusion", "qwen": "ar", "tiny": "ar"}


def add_cell(con, cell_id, model, method, bits, budget, benchmark, outcomes, first_task=0):
    """Insert one cell: `outcomes[i][j]` is whether sample j of problem i passed."""
    rows = [
        (cell_id, model, FAMILY[model], method, bits, budget, benchmark, f"{benchmark}/{first_task + i}", j,
         "", bool(p), "passed" if p else "failed")
        for i, problem in enumerate(outcomes)
        for j, p in enumerate(problem)
    ]
    con.executemany(
        "INSERT INTO samples (cell_id, model, family, method, bits, budget, benchmark, task_id, sample_idx,"
        " completion, passed, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    n_samples = len(outcomes[0])
    pass_at_1 = float(np.mean([np.mean(p) for p in outcomes]))
    avg_bits = 16.0 if method == "fp" else float(bits if bits is not None else budget)
    con.execute(
        "INSERT INTO results (cell_id, model, family, method, bits, budget, avg_bits, benchmark, n_problems,"
        " n_samples, pass_at_1) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [cell_id, model, FAMILY[model], method, bits, budget, avg_bits, benchmark, len(outcomes), n_samples,
         pass_at_1])


def greedy(first_outcomes):
    return [[p] for p in first_outcomes]


CODA_FP = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
CODA_GPTQ4 = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]  # 4 pass->fail, 1 fail->pass
QWEN_FP = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
QWEN_GPTQ4 = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]  # 6 pass->fail
MBPP_FP = [[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]]
MBPP_RTN4 = [[1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]


@pytest.fixture
def store():
    con = duckdb.connect()
    con.execute(STORE_TABLES)
    # coda fp has one extra solved problem the quantized cells lack
    add_cell(con, "coda-fp", "coda", "fp", None, None, "humaneval", greedy(CODA_FP + [1]))
    add_cell(con, "coda-gptq4", "coda", "gptq", 4, None, "humaneval", greedy(CODA_GPTQ4))
    add_cell(con, "coda-gptq2", "coda", "gptq", 2, None, "humaneval", greedy([0] * 10))
    add_cell(con, "coda-hawq3", "coda", "hawq", None, 3.0, "humaneval", greedy(CODA_FP))
    add_cell(con, "qwen-fp", "qwen", "fp", None, None, "humaneval", greedy(QWEN_FP))
    add_cell(con, "qwen-gptq4", "qwen", "gptq", 4, None, "humaneval", greedy(QWEN_GPTQ4))
    add_cell(con, "qwen-hawq3", "qwen", "hawq", None, 3.0, "humaneval", greedy(QWEN_FP))
    add_cell(con, "tiny-fp", "tiny", "fp", None, None, "humaneval", greedy([0] * 5))
    add_cell(con, "tiny-rtn4", "tiny", "rtn", 4, None, "humaneval", greedy([0, 1, 0, 0, 0]))
    # a sampling grid on mbpp (3 seeds per problem) and a greedy fp cell that must not pair with it
    add_cell(con, "coda-fp-mbpp-s3", "coda", "fp", None, None, "mbpp", MBPP_FP, first_task=11)
    add_cell(con, "coda-rtn4-mbpp-s3", "coda", "rtn", 4, None, "mbpp", MBPP_RTN4, first_task=11)
    add_cell(con, "coda-fp-mbpp-greedy", "coda", "fp", None, None, "mbpp", greedy([1, 1, 1, 1]), first_task=11)
    con.executemany("INSERT INTO pairs VALUES (?, ?)", [("coda", "qwen"), ("coda", "qwen")])  # declared twice
    yield con
    con.close()


def degradation_row(con, cell_id):
    frame = con.sql(f"SELECT * FROM degradation WHERE cell_id = '{cell_id}'").df()
    assert len(frame) == 1
    return frame.iloc[0]


def cell_frame(con, cell_id):
    return con.sql(f"SELECT task_id, sample_idx, passed FROM samples WHERE cell_id = '{cell_id}'").df()


def all_rows(con, relation):
    return con.sql(f"SELECT * FROM {relation} ORDER BY ALL").fetchall()


# --------------------------------------------------------------------------- creation


def test_create_views_is_idempotent_and_keeps_existing_statistics(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    before = all_rows(store, "degradation")
    views.create_views(store)
    views.create_views(store)
    assert all_rows(store, "degradation") == before


def test_views_answer_before_any_statistics_exist_with_empty_intervals(store):
    views.create_views(store)
    row = degradation_row(store, "coda-gptq4")
    assert row["delta_pass_at_1"] == pytest.approx(-0.3)
    assert not row["stats_current"]
    assert pd.isna(row["delta_ci_low"]) and pd.isna(row["mcnemar_p"])


def test_degradation_has_the_documented_columns_in_order(store):
    views.create_views(store)
    columns = [c for c in store.sql("SELECT * FROM degradation").columns]
    assert columns[:18] == [
        "model", "family", "method", "bits", "budget", "avg_bits", "benchmark", "n_problems",
        "fp_pass_at_1", "pass_at_1", "delta_pass_at_1", "relative_degradation",
        "flips_pass_to_fail", "flips_fail_to_pass", "mcnemar_p", "delta_ci_low", "delta_ci_high",
        "min_detectable_drop"]


def test_claim_has_the_documented_columns_in_order(store):
    views.create_views(store)
    columns = store.sql("SELECT * FROM claim").columns
    assert columns[:12] == [
        "diffusion_model", "ar_model", "method", "bits", "budget", "benchmark",
        "diffusion_delta", "ar_delta", "difference", "ci_low", "ci_high", "verdict"]


# --------------------------------------------------------------------------- degradation


def test_degradation_has_one_row_per_quantized_cell_with_its_fp_cell(store):
    views.create_views(store)
    got = dict(store.sql("SELECT cell_id, fp_cell_id FROM degradation").fetchall())
    assert got == {
        "coda-gptq4": "coda-fp", "coda-gptq2": "coda-fp", "coda-hawq3": "coda-fp",
        "qwen-gptq4": "qwen-fp", "qwen-hawq3": "qwen-fp", "tiny-rtn4": "tiny-fp",
        "coda-rtn4-mbpp-s3": "coda-fp-mbpp-s3",  # same n_samples, not the greedy fp cell
    }


def test_degradation_of_the_hand_counted_cell(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    row = degradation_row(store, "coda-gptq4")
    assert row["n_problems"] == 10  # the fp cell's extra problem is not shared
    assert (row["fp_pass_at_1"], row["pass_at_1"]) == pytest.approx((0.7, 0.4))
    assert row["delta_pass_at_1"] == pytest.approx(-0.3)
    assert row["relative_degradation"] == pytest.approx(-0.3 / 0.7)
    assert (row["flips_pass_to_fail"], row["flips_fail_to_pass"]) == (4, 1)
    assert row["mcnemar_p"] == pytest.approx(2 * (1 + 5) / 32)
    assert (row["method"], row["bits"], row["avg_bits"], row["family"]) == ("gptq", 4, 4.0, "diffusion")
    assert row["stats_current"]


def test_degradation_intervals_equal_the_python_statistics(store):
    views.refresh_statistics(store, resamples=RESAMPLES, seed=7)
    for cell_id, fp_cell_id in [("qwen-gptq4", "qwen-fp"), ("coda-rtn4-mbpp-s3", "coda-fp-mbpp-s3")]:
        want = stats.degradation(cell_frame(store, fp_cell_id), cell_frame(store, cell_id), RESAMPLES, seed=7)
        row = degradation_row(store, cell_id)
        assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((want.delta_ci_low, want.delta_ci_high))
        assert row["mcnemar_p"] == pytest.approx(want.mcnemar_p)
        assert row["delta_pass_at_1"] == pytest.approx(want.delta_pass_at_1)
        assert row["min_detectable_drop"] == pytest.approx(want.min_detectable_drop)


def test_the_minimum_detectable_drop_of_the_hand_counted_cell(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    row = degradation_row(store, "coda-gptq4")
    # one sample per problem: the bound P(1-P) of the fp cell's 0.7 on its 10 shared problems
    assert row["min_detectable_drop"] == pytest.approx(2.8015849 * math.sqrt(2 * 0.7 * 0.3 / 10))


def test_statistics_tables_from_before_the_power_column_gain_it():
    con = duckdb.connect()
    con.execute(STORE_TABLES)
    con.execute("CREATE TABLE degradation_stats (cell_id VARCHAR, fp_cell_id VARCHAR, n_problems BIGINT)")
    views.create_views(con)
    assert "min_detectable_drop" in con.sql("SELECT * FROM degradation").columns


def test_degradation_of_a_sampling_cell_uses_all_samples_for_delta_and_first_samples_for_flips(store):
    views.create_views(store)
    row = degradation_row(store, "coda-rtn4-mbpp-s3")
    fp = np.mean([np.mean(p) for p in MBPP_FP])
    quantized = np.mean([np.mean(p) for p in MBPP_RTN4])
    assert row["delta_pass_at_1"] == pytest.approx(quantized - fp)
    # first samples: fp [1, 0, 1, 0], quantized [1, 0, 1, 1]
    assert (row["flips_pass_to_fail"], row["flips_fail_to_pass"]) == (0, 1)


def test_relative_degradation_is_null_when_fp_never_passes(store):
    views.create_views(store)
    row = degradation_row(store, "tiny-rtn4")
    assert row["delta_pass_at_1"] == pytest.approx(0.2)
    assert pd.isna(row["relative_degradation"])


def test_changed_samples_update_estimates_and_hide_stale_intervals_until_refresh(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    store.execute("UPDATE samples SET passed = true WHERE cell_id = 'coda-gptq4' AND task_id = 'humaneval/3'")
    stale = degradation_row(store, "coda-gptq4")
    assert stale["delta_pass_at_1"] == pytest.approx(-0.2)
    assert stale["flips_pass_to_fail"] == 3
    assert not stale["stats_current"] and pd.isna(stale["delta_ci_low"]) and pd.isna(stale["mcnemar_p"])
    assert degradation_row(store, "qwen-gptq4")["stats_current"]
    views.refresh_statistics(store, resamples=RESAMPLES)
    fresh = degradation_row(store, "coda-gptq4")
    assert fresh["stats_current"] and fresh["mcnemar_p"] == pytest.approx(stats.mcnemar_exact_p(3, 1))


# --------------------------------------------------------------------------- claim


def claim_rows(con):
    return con.sql("SELECT * FROM claim ORDER BY method").df().set_index("method")


def test_claim_has_one_row_per_setting_both_paired_models_have(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    rows = claim_rows(store)
    assert sorted(rows.index) == ["gptq", "hawq"]  # coda gptq 2-bit has no qwen partner; pair declared twice
    assert rows.loc["gptq", "bits"] == 4 and pd.isna(rows.loc["gptq", "budget"])
    assert pd.isna(rows.loc["hawq", "bits"]) and rows.loc["hawq", "budget"] == 3.0
    assert (rows["diffusion_model"] == "coda").all() and (rows["ar_model"] == "qwen").all()


def test_claim_values_match_hand_computation_and_python_statistics(store):
    views.refresh_statistics(store, resamples=RESAMPLES, seed=3)
    row = claim_rows(store).loc["gptq"]
    assert (row["diffusion_delta"], row["ar_delta"]) == pytest.approx((-0.3, -0.6))
    assert row["difference"] == pytest.approx(0.3)
    want = stats.claim(*(cell_frame(store, c) for c in ["coda-fp", "coda-gptq4", "qwen-fp", "qwen-gptq4"]),
                       resamples=RESAMPLES, seed=3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((want.ci_low, want.ci_high))
    assert row["verdict"] == want.verdict == stats.claim_verdict(row["ci_low"], row["ci_high"])


def test_claim_without_degradation_difference_is_inconclusive(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    row = claim_rows(store).loc["hawq"]
    assert row["difference"] == 0.0
    assert (row["ci_low"], row["ci_high"], row["verdict"]) == (0.0, 0.0, "inconclusive")


# --------------------------------------------------------------------------- pass@k per cell


def pass_at_k_rows(con, cell_id):
    return con.sql(f"SELECT * FROM cell_pass_at_k WHERE cell_id = '{cell_id}' ORDER BY k").df()


def test_cell_pass_at_k_estimates_in_sql_match_the_unbiased_estimator(store):
    views.create_views(store)
    rows = pass_at_k_rows(store, "coda-fp-mbpp-s3")
    assert rows["k"].tolist() == [1, 2, 3]
    passing = np.array([sum(p) for p in MBPP_FP])
    for k in (1, 2, 3):
        want = stats.pass_at_k(3, passing, k).mean()
        assert rows.loc[k - 1, "estimate"] == pytest.approx(want, abs=1e-12)


def test_cell_pass_at_k_reports_seed_spread_beside_pass_at_1(store):
    views.create_views(store)
    rows = pass_at_k_rows(store, "coda-fp-mbpp-s3")
    per_seed = np.array(MBPP_FP).mean(axis=0)  # pass@1 of seed replicates 0, 1, 2
    assert rows.loc[0, "seed_std"] == pytest.approx(per_seed.std(ddof=1))
    assert (rows.loc[0, "seed_min"], rows.loc[0, "seed_max"], rows.loc[0, "n_seeds"]) == (
        per_seed.min(), per_seed.max(), 3)
    assert rows.loc[1:, "seed_std"].isna().all()
    assert pd.isna(pass_at_k_rows(store, "coda-fp")["seed_std"].iloc[0])  # one seed: no spread


def test_cell_pass_at_k_intervals_equal_the_python_statistics(store):
    views.refresh_statistics(store, resamples=RESAMPLES, seed=5)
    rows = pass_at_k_rows(store, "coda-fp-mbpp-s3")
    want = stats.cell_pass_at_k(cell_frame(store, "coda-fp-mbpp-s3"), resamples=RESAMPLES, seed=5)
    np.testing.assert_allclose(rows[["ci_low", "ci_high"]], want[["ci_low", "ci_high"]])
    assert rows["stats_current"].all()


# --------------------------------------------------------------------------- refresh


def test_refresh_statistics_replaces_rather_than_appends(store):
    first = views.refresh_statistics(store, resamples=RESAMPLES)
    snapshot = {t: all_rows(store, t) for t in ("cell_intervals", "degradation_stats", "claim_stats")}
    second = views.refresh_statistics(store, resamples=RESAMPLES)
    assert first == second == {"cell_intervals": 9 + 3 + 3 + 1, "degradation_stats": 7, "claim_stats": 2}
    assert {t: all_rows(store, t) for t in snapshot} == snapshot


def test_refresh_statistics_on_an_empty_store_leaves_empty_tables(store):
    for table in ("samples", "results", "pairs"):
        store.execute(f"DELETE FROM {table}")
    assert views.refresh_statistics(store) == {"cell_intervals": 0, "degradation_stats": 0, "claim_stats": 0}
    assert all_rows(store, "claim") == []


def test_example_queries_in_the_module_docstring_run(store):
    views.refresh_statistics(store, resamples=RESAMPLES)
    queries = re.findall(r"(SELECT .*?;)", views.__doc__, flags=re.S)
    assert len(queries) == 3
    for query in queries:
        assert store.sql(query).fetchall()


def test_a_cell_of_the_published_harness_is_compared_with_the_fp_cell_of_that_harness(store):
    add_cell(store, "coda-fp-published", "coda", "fp", None, None, "humaneval", greedy(CODA_FP))
    add_cell(store, "coda-gptq4-published", "coda", "gptq", 4, None, "humaneval", greedy(CODA_GPTQ4))
    store.execute("UPDATE results SET harness = 'coda-published' WHERE cell_id LIKE '%-published'")
    views.create_views(store)
    pairs = dict(store.sql("SELECT cell_id, fp_cell_id FROM degradation WHERE model = 'coda' "
                           "AND benchmark = 'humaneval'").fetchall())
    assert pairs["coda-gptq4-published"] == "coda-fp-published" and pairs["coda-gptq4"] == "coda-fp"
    assert len(pairs) == 4
