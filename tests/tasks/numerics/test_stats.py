import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from qrobust.tasks.numerics import stats

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@st.composite
def n_c_k(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


def cell_samples(outcomes) -> pd.DataFrame:
    """Samples frame of one cell from per-problem lists of sample outcomes (index = sample_idx)."""
    rows = [
        {"task_id": f"T/{i:04d}", "sample_idx": j, "passed": bool(p)}
        for i, problem in enumerate(outcomes)
        for j, p in enumerate(problem)
    ]
    return pd.DataFrame(rows)


def greedy_cell(first_outcomes) -> pd.DataFrame:
    return cell_samples([[p] for p in first_outcomes])


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_hand_computed_values():
    assert stats.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert stats.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert stats.pass_at_k(4, 3, 2) == 1.0  # fewer failures than k: every k-subset has a pass
    assert stats.pass_at_k(7, 0, 3) == 0.0


def test_pass_at_k_is_accurate_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 does not fit a float; the product form does not need it.
    assert stats.pass_at_k(2000, 3, 1000) == pytest.approx(float(exact_pass_at_k(2000, 3, 1000)), rel=1e-12)


def test_pass_at_k_broadcasts_arrays_elementwise():
    n = np.array([5, 10, 4, 200])
    c = np.array([2, 3, 3, 17])
    got = stats.pass_at_k(n, c, 2)
    want = [float(exact_pass_at_k(a, b, 2)) for a, b in zip(n, c)]
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_pass_at_k_accepts_an_array_of_ks():
    np.testing.assert_allclose(stats.pass_at_k(5, 2, np.array([1, 2, 3, 4])), [0.4, 0.7, 0.9, 1.0])


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 4, 1), (3, -1, 1), (-1, 0, 1), (5, 2, 0), (5, 2.5, 1)])
def test_pass_at_k_rejects_invalid_counts_with_a_one_line_error(n, c, k):
    with pytest.raises(ValueError) as error:
        stats.pass_at_k(n, c, k)
    assert "\n" not in str(error.value)


def test_pass_at_k_error_names_the_offending_counts():
    with pytest.raises(ValueError, match="n=3, c=1, k=4"):
        stats.pass_at_k([5, 3], [1, 1], [2, 4])


@PROPERTY_SETTINGS
@given(n_c_k())
def test_pass_at_k_matches_exact_rational_formula(args):
    n, c, k = args
    assert stats.pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)


@PROPERTY_SETTINGS
@given(n_c_k(max_n=300))
def test_pass_at_k_lies_in_unit_interval(args):
    assert 0.0 <= stats.pass_at_k(*args) <= 1.0


@PROPERTY_SETTINGS
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_is_non_decreasing_in_k(n_c):
    n, c = n_c
    curve = stats.pass_at_k(n, c, np.arange(1, n + 1))
    assert np.all(np.diff(curve) >= -1e-12)


@PROPERTY_SETTINGS
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_pass_at_k_is_non_decreasing_in_passing_samples(n_k):
    n, k = n_k
    by_c = stats.pass_at_k(n, np.arange(0, n + 1), k)
    assert np.all(np.diff(by_c) >= -1e-12)


@PROPERTY_SETTINGS
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_1_is_the_fraction_of_passing_samples(n_c):
    n, c = n_c
    assert stats.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


@PROPERTY_SETTINGS
@given(st.lists(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))), min_size=1, max_size=8))
def test_pass_at_k_curve_agrees_with_pass_at_k(problems):
    n = np.array([p[0] for p in problems])
    c = np.array([p[1] for p in problems])
    max_k = int(n.min())
    curve = stats.pass_at_k_curve(n, c, max_k)
    for k in range(1, max_k + 1):
        np.testing.assert_allclose(curve[:, k - 1], stats.pass_at_k(n, c, k), atol=1e-12)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_weights_are_resample_multiplicities():
    weights = stats.bootstrap_weights(7, resamples=50, seed=3)
    assert weights.shape == (50, 7)
    assert np.all(weights.sum(axis=1) == 7)
    assert np.all(weights >= 0)


def test_bootstrap_weights_repeat_for_a_seed_and_change_with_it():
    a = stats.bootstrap_weights(20, 100, seed=1)
    np.testing.assert_array_equal(a, stats.bootstrap_weights(20, 100, seed=1))
    assert not np.array_equal(a, stats.bootstrap_weights(20, 100, seed=2))


def test_bootstrap_weights_draw_every_problem_equally_often_on_average():
    weights = stats.bootstrap_weights(5, resamples=20000, seed=0)
    np.testing.assert_allclose(weights.mean(axis=0), 1.0, atol=0.03)


def test_bootstrap_spread_of_the_mean_matches_the_plug_in_standard_error():
    values = np.random.default_rng(3).random(50)
    means = stats.bootstrap_means(values, resamples=20000, seed=1)
    assert means.std() == pytest.approx(values.std() / np.sqrt(values.size), rel=0.03)
    assert means.mean() == pytest.approx(values.mean(), abs=1e-3)


def test_percentile_interval_of_a_known_distribution():
    assert stats.percentile_interval(np.arange(101), level=0.9) == pytest.approx((5.0, 95.0))


def test_bootstrap_interval_of_a_constant_is_that_constant():
    assert stats.bootstrap_mean_interval(np.full(12, 0.25)) == (0.25, 0.25)


def test_bootstrap_interval_of_a_batch_row_equals_the_interval_of_that_row_alone():
    values = np.random.default_rng(0).random((3, 30))
    low, high = stats.bootstrap_mean_interval(values, resamples=500, seed=4)
    alone = stats.bootstrap_mean_interval(values[1], resamples=500, seed=4)
    assert (low[1], high[1]) == pytest.approx(alone)


@PROPERTY_SETTINGS
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 10_000))
def test_bootstrap_interval_is_ordered_and_within_the_data_range(values, seed):
    low, high = stats.bootstrap_mean_interval(values, resamples=200, seed=seed)
    assert min(values) - 1e-12 <= low <= high <= max(values) + 1e-12


def test_bootstrap_rejects_empty_input():
    with pytest.raises(ValueError, match="n_problems >= 1"):
        stats.bootstrap_mean_interval([])


# --------------------------------------------------------------------------- McNemar and verdict


def test_mcnemar_matches_hand_computed_value():
    # 2 * P(X <= 1), X ~ Binom(10, 1/2) = 2 * (1 + 10) / 1024
    assert stats.mcnemar_exact_p(1, 9) == 0.021484375
    assert stats.mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact_p(4, 1) == pytest.approx(2 * 6 / 32)


def test_mcnemar_is_one_without_discordant_pairs_or_with_balanced_flips():
    assert stats.mcnemar_exact_p(0, 0) == 1.0
    assert stats.mcnemar_exact_p(5, 5) == 1.0


@PROPERTY_SETTINGS
@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_equals_two_sided_exact_binomial_test(b, c):
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact_p(b, c) == pytest.approx(want, rel=1e-9)
    assert stats.mcnemar_exact_p(b, c) == stats.mcnemar_exact_p(c, b)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match=">= 0"):
        stats.mcnemar_exact_p(-1, 3)


@pytest.mark.parametrize("low, high, verdict", [
    (0.01, 0.2, "supported"), (-0.3, -0.001, "contradicted"),
    (-0.1, 0.1, "inconclusive"), (0.0, 0.2, "inconclusive"), (-0.2, 0.0, "inconclusive"),
])
def test_claim_verdict_reads_the_interval_against_zero(low, high, verdict):
    assert stats.claim_verdict(low, high) == verdict


# --------------------------------------------------------------------------- per-problem tables


def test_problem_outcomes_counts_samples_and_takes_the_lowest_sample_index_as_first():
    samples = pd.DataFrame({
        "task_id": ["a", "a", "a", "b", "b"],
        "sample_idx": [2, 0, 1, 1, 0],
        "passed": [True, False, True, True, None],  # missing verdict counts as a failure
    })
    got = stats.problem_outcomes(samples).set_index("task_id")
    assert got.loc["a", "n"] == 3 and got.loc["a", "c"] == 2
    assert not got.loc["a", "first_passed"] and not got.loc["b", "first_passed"]
    assert got.loc["b", "pass_rate"] == 0.5


def test_seed_spread_is_over_per_index_pass_rates():
    # per-seed pass@1 over 4 problems: idx0 2/4, idx1 3/4, idx2 4/4
    samples = cell_samples([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    spread = stats.seed_spread(samples)
    assert spread["n_seeds"] == 3
    assert spread["seed_std"] == pytest.approx(0.25)
    assert (spread["seed_min"], spread["seed_max"]) == (0.5, 1.0)


def test_seed_spread_of_a_single_seed_has_no_std():
    spread = stats.seed_spread(greedy_cell([1, 0]))
    assert math.isnan(spread["seed_std"]) and spread["seed_min"] == spread["seed_max"] == 0.5


def test_cell_pass_at_k_covers_every_k_all_problems_support():
    # problem 0: 1 of 3 pass, problem 1: 3 of 3 pass
    table = stats.cell_pass_at_k(cell_samples([[0, 1, 0], [1, 1, 1]]), resamples=300)
    assert table["k"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(table["estimate"], [(1 / 3 + 1) / 2, (2 / 3 + 1) / 2, 1.0])
    assert (table["n_problems"] == 2).all()
    assert ((table["ci_low"] <= table["estimate"]) & (table["estimate"] <= table["ci_high"])).all()


def test_cell_pass_at_k_stops_at_the_problem_with_fewest_samples():
    table = stats.cell_pass_at_k(cell_samples([[0, 1, 0], [1, 1]]), resamples=100)
    assert table["k"].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"1\.\.2"):
        stats.cell_pass_at_k(cell_samples([[0, 1, 0], [1, 1]]), ks=[3])


def test_cell_pass_at_k_reports_seed_spread_only_beside_pass_at_1():
    table = stats.cell_pass_at_k(cell_samples([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]]), resamples=100)
    assert table.loc[0, "seed_std"] == pytest.approx(0.25) and table.loc[0, "n_seeds"] == 3
    assert table.loc[1:, ["seed_std", "seed_min", "seed_max", "n_seeds"]].isna().all().all()


def test_cell_pass_at_k_interval_is_the_bootstrap_over_problems():
    outcomes = np.random.default_rng(1).random((25, 4)) < 0.4
    table = stats.cell_pass_at_k(cell_samples(outcomes), ks=[2], resamples=400, seed=9)
    per_problem = stats.pass_at_k(4, outcomes.sum(axis=1), 2)
    want = stats.bootstrap_mean_interval(per_problem, resamples=400, seed=9)
    assert (table.loc[0, "ci_low"], table.loc[0, "ci_high"]) == pytest.approx(want)


def test_cell_pass_at_k_splits_a_frame_by_cell():
    two = pd.concat([greedy_cell([1, 0]).assign(cell_id="x"), greedy_cell([1, 1, 1]).assign(cell_id="y")])
    table = stats.cell_pass_at_k(two, resamples=100)
    assert table.set_index("cell_id")["estimate"].to_dict() == {"x": 0.5, "y": 1.0}


def test_pass_at_k_table_from_verdict_records_keeps_the_supported_reported_ks():
    verdicts = cell_samples([[0, 1, 0, 0, 1], [1, 1, 1, 1, 1]]).to_dict("records")
    table = stats.pass_at_k_table(verdicts)
    assert list(table) == [1, 5]  # 10 and above need more than 5 samples per problem
    assert table[1] == pytest.approx((2 / 5 + 1) / 2) and table[5] == 1.0
    assert stats.pass_at_k_table([]) == {}


# --------------------------------------------------------------------------- degradation


FP_FIRST = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
Q_FIRST = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]  # 4 pass->fail (3..6), 1 fail->pass (9)


def test_degradation_of_a_hand_counted_ten_problem_case():
    result = stats.degradation(greedy_cell(FP_FIRST), greedy_cell(Q_FIRST), resamples=500)
    assert result.n_problems == 10
    assert (result.fp_pass_at_1, result.pass_at_1) == pytest.approx((0.7, 0.4))
    assert result.delta_pass_at_1 == pytest.approx(-0.3)
    assert result.relative_degradation == pytest.approx(-0.3 / 0.7)
    assert (result.flips_pass_to_fail, result.flips_fail_to_pass) == (4, 1)
    assert result.mcnemar_p == pytest.approx(12 / 32)
    assert result.delta_ci_low <= -0.3 <= result.delta_ci_high


def test_degradation_interval_resamples_the_same_problems_for_both_cells():
    result = stats.degradation(greedy_cell(FP_FIRST), greedy_cell(Q_FIRST), resamples=700, seed=5)
    per_problem_delta = np.array(Q_FIRST, float) - np.array(FP_FIRST, float)
    want = stats.bootstrap_mean_interval(per_problem_delta, resamples=700, seed=5)
    assert (result.delta_ci_low, result.delta_ci_high) == pytest.approx(want)


def test_degradation_uses_only_problems_both_cells_have():
    fp = greedy_cell(FP_FIRST + [1, 1])  # two extra solved problems the quantized cell lacks
    result = stats.degradation(fp, greedy_cell(Q_FIRST), resamples=100)
    assert result.n_problems == 10 and result.fp_pass_at_1 == pytest.approx(0.7)


def test_degradation_flips_use_the_first_sample_and_delta_uses_all_samples():
    fp = cell_samples([[0, 1, 1], [1, 1, 1]])
    quantized = cell_samples([[1, 0, 0], [1, 1, 1]])
    result = stats.degradation(fp, quantized, resamples=100)
    assert (result.flips_pass_to_fail, result.flips_fail_to_pass) == (0, 1)
    assert result.delta_pass_at_1 == pytest.approx((1 / 3 + 1) / 2 - (2 / 3 + 1) / 2)


def test_relative_degradation_is_nan_when_fp_never_passes():
    result = stats.degradation(greedy_cell([0, 0, 0]), greedy_cell([0, 1, 0]), resamples=100)
    assert math.isnan(result.relative_degradation)
    assert result.delta_pass_at_1 == pytest.approx(1 / 3)


def test_degradation_of_cells_without_common_problems_is_an_error():
    fp = greedy_cell([1])
    quantized = greedy_cell([1]).assign(task_id="other")
    with pytest.raises(ValueError, match="share no problems"):
        stats.degradation(fp, quantized)


# --------------------------------------------------------------------------- claim


def test_claim_is_the_difference_of_the_two_models_deltas():
    ar_fp = [1] * 8 + [0, 0]
    ar_q = [1, 1] + [0] * 8  # delta -0.6
    result = stats.claim(greedy_cell(FP_FIRST), greedy_cell(Q_FIRST), greedy_cell(ar_fp), greedy_cell(ar_q),
                         resamples=800, seed=2)
    assert (result.diffusion_delta, result.ar_delta) == pytest.approx((-0.3, -0.6))
    assert result.difference == pytest.approx(0.3)
    per_problem = (np.subtract(Q_FIRST, FP_FIRST) - np.subtract(ar_q, ar_fp)).astype(float)
    assert (result.ci_low, result.ci_high) == pytest.approx(stats.bootstrap_mean_interval(per_problem, 800, 2))
    assert result.verdict == stats.claim_verdict(result.ci_low, result.ci_high)


def test_claim_uses_the_problems_all_four_cells_share():
    d_fp = greedy_cell([1, 1, 0, 1])
    d_q = greedy_cell([1, 0, 0])  # lacks T/03
    a_fp = greedy_cell([1, 1, 1, 1])
    a_q = greedy_cell([0, 0, 0, 0])
    result = stats.claim(d_fp, d_q, a_fp, a_q, resamples=100)
    assert result.n_problems == 3
    assert (result.diffusion_delta, result.ar_delta) == pytest.approx((-1 / 3, -1.0))


def test_claim_with_identical_degradation_is_inconclusive():
    cell = greedy_cell([1, 0, 1, 1])
    result = stats.claim(cell, cell, cell, cell, resamples=100)
    assert result.difference == 0.0 and result.verdict == "inconclusive"


# --------------------------------------------------------------------------- acceptance: coverage and verdicts
# Problems are drawn from a population (per-problem pass probability ~ Beta)
# afresh in every replicate, so the true value is the population mean the
# bootstrap over problems targets.

REPLICATES, PROBLEMS, SAMPLES = 200, 200, 5


def pass_rates(rng, probability, n_samples=SAMPLES):
    return rng.binomial(n_samples, probability) / n_samples


def coverage(values, truth):
    low, high = stats.bootstrap_mean_interval(values)
    return np.mean((low <= truth) & (truth <= high))


def test_cell_pass_at_1_interval_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(11)
    probability = rng.beta(2, 3, size=(REPLICATES, PROBLEMS))  # population mean 0.4
    assert 0.88 <= coverage(pass_rates(rng, probability), 0.4) <= 0.99


def test_cell_pass_at_5_interval_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(12)
    probability = rng.beta(2, 3, size=(REPLICATES, PROBLEMS))
    passing = rng.binomial(10, probability)
    per_problem = stats.pass_at_k(10, passing, 5)
    # E[(1-p)^5] for p ~ Beta(2, 3) is B(2, 8) / B(2, 3) = 1/6
    assert 0.88 <= coverage(per_problem, 1 - 1 / 6) <= 0.99


def test_degradation_interval_covers_the_true_delta_at_the_nominal_rate():
    rng = np.random.default_rng(13)
    fp = rng.beta(2, 2, size=(REPLICATES, PROBLEMS))
    quantized = fp * (1 - 0.3)  # true delta -0.3 * E[fp] = -0.15
    delta = pass_rates(rng, quantized) - pass_rates(rng, fp)
    assert 0.88 <= coverage(delta, -0.15) <= 0.99


def simulate_claim(rng, diffusion_loss, ar_loss):
    """Per-problem D for REPLICATES benchmarks, and the true D.

    Both models share each problem's difficulty u ~ Beta(2, 2); their fp pass
    probabilities have mean 0.5, and quantization scales each by (1 - loss).
    """
    u = rng.beta(2, 2, size=(REPLICATES, PROBLEMS))
    diffusion_fp, ar_fp = 0.1 + 0.8 * u, 0.05 + 0.9 * u
    diffusion_delta = pass_rates(rng, diffusion_fp * (1 - diffusion_loss)) - pass_rates(rng, diffusion_fp)
    ar_delta = pass_rates(rng, ar_fp * (1 - ar_loss)) - pass_rates(rng, ar_fp)
    return diffusion_delta - ar_delta, 0.5 * (ar_loss - diffusion_loss)


def verdict_rates(per_problem_difference):
    low, high = stats.bootstrap_mean_interval(per_problem_difference)
    verdicts = pd.Series([stats.claim_verdict(a, b) for a, b in zip(low, high)])
    return verdicts.value_counts(normalize=True).reindex(
        ["supported", "contradicted", "inconclusive"], fill_value=0.0)


def test_claim_is_supported_when_diffusion_clearly_degrades_less():
    difference, truth = simulate_claim(np.random.default_rng(21), diffusion_loss=0.05, ar_loss=0.3)
    rates = verdict_rates(difference)
    assert rates["supported"] >= 0.9 and rates["contradicted"] <= 0.01
    assert 0.88 <= coverage(difference, truth) <= 0.99


def test_claim_is_contradicted_when_diffusion_clearly_degrades_more():
    difference, _ = simulate_claim(np.random.default_rng(22), diffusion_loss=0.3, ar_loss=0.05)
    rates = verdict_rates(difference)
    assert rates["contradicted"] >= 0.9 and rates["supported"] <= 0.01


def test_claim_without_an_effect_is_inconclusive_at_about_the_nominal_rate():
    difference, truth = simulate_claim(np.random.default_rng(23), diffusion_loss=0.2, ar_loss=0.2)
    assert truth == 0.0
    assert 0.88 <= verdict_rates(difference)["inconclusive"] <= 0.99
    assert 0.88 <= coverage(difference, truth) <= 0.99


def samples_from_counts(passing, n_samples=SAMPLES):
    return cell_samples([[j < c for j in range(n_samples)] for c in passing])


def test_claim_on_sample_frames_equals_the_batched_computation_used_above():
    rng = np.random.default_rng(24)
    counts = [rng.binomial(SAMPLES, p, size=PROBLEMS) for p in (0.6, 0.5, 0.7, 0.3)]
    result = stats.claim(*(samples_from_counts(c) for c in counts))
    difference = ((counts[1] - counts[0]) - (counts[3] - counts[2])) / SAMPLES
    low, high = stats.bootstrap_mean_interval(difference[None, :])
    assert (result.ci_low, result.ci_high) == pytest.approx((low[0], high[0]))
    assert result.difference == pytest.approx(difference.mean())


# --------------------------------------------------------------------------- power


Z_80_95 = 1.959964 + 0.841621


def test_with_one_sample_the_detectable_drop_is_the_binomial_figure_of_the_fp_pass_rate():
    # the noise quoted for CoDA on HumanEval: sqrt(0.543 * 0.457 / 164) = 3.9 points per cell
    solved = np.array([1] * 89 + [0] * 75)
    drop = stats.minimum_detectable_drop(np.ones(164), solved, np.ones(164))
    rate = 89 / 164
    assert drop == pytest.approx(Z_80_95 * math.sqrt(2 * rate * (1 - rate) / 164), rel=1e-6)
    assert math.sqrt(rate * (1 - rate) / 164) == pytest.approx(0.039, abs=5e-4)


def test_with_several_samples_each_problems_own_variance_is_estimated():
    fp_n, fp_c = np.array([4, 4, 4]), np.array([0, 2, 4])  # only the middle problem is noisy
    variance = stats.sampling_variance_per_problem(fp_n, fp_c)
    assert variance.tolist() == pytest.approx([0.0, 2 * 2 / 12, 0.0])
    drop = stats.minimum_detectable_drop(fp_n, fp_c, np.array([4, 4, 4]))
    assert drop == pytest.approx(Z_80_95 * math.sqrt((1 / 3) * (1 / 4 + 1 / 4) / 9))


def test_a_cell_that_never_varies_could_detect_any_drop():
    assert stats.minimum_detectable_drop(np.full(5, 3), np.full(5, 3), np.full(5, 3)) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=30), st.integers(1, 8), st.integers(1, 8))
def test_more_samples_in_the_quantized_cell_never_make_the_detectable_drop_larger(solved, fewer, more_by):
    fp_n = np.full(len(solved), 4)
    smaller_n, larger_n = np.full(len(solved), fewer), np.full(len(solved), fewer + more_by)
    low = stats.minimum_detectable_drop(fp_n, np.array(solved), larger_n)
    high = stats.minimum_detectable_drop(fp_n, np.array(solved), smaller_n)
    assert 0 <= low <= high + 1e-12


def test_bad_power_or_counts_are_refused_naming_them():
    with pytest.raises(ValueError, match="power and level must lie in"):
        stats.minimum_detectable_drop([1], [1], [1], power=1.2)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        stats.minimum_detectable_drop([1], [2], [1])
