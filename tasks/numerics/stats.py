"""Statistics over per-problem benchmark outcomes: pass@k, bootstrap intervals,
paired degradation tests and the diffusion-vs-AR claim.

Everything here is a pure function of numpy arrays or pandas frames; nothing
touches the store. The unit of resampling is always the *problem*: problems are
treated as a sample from a population of coding tasks, so a cell's uncertainty
comes from which problems happened to be in the benchmark (and, with several
samples per problem, from each problem's sampling noise, which rides along
inside the per-problem rate).

Conventions
-----------
- A samples frame has at least the columns ``task_id``, ``sample_idx`` and
  ``passed`` (one row per problem x sample); frames holding several cells also
  carry ``cell_id``. A missing ``passed`` counts as a failure.
- Per-problem pass@1 is ``c / n`` (passing samples over samples); a cell's
  pass@1 is the mean of that over problems.
- Binary outcome per problem (for McNemar and the flip counts): a problem is
  *solved* when its first sample (lowest ``sample_idx``, normally 0, drawn
  with the run's base seed) passed. Greedy cells have only that sample; in
  sampling cells it pairs the draws the two cells made with the same seed, and
  it needs no tie rule. The delta and its interval use all samples.
- Intervals are percentile-bootstrap intervals (default 95%, 2000 resamples,
  seed 0). Problems are ordered by task_id before resampling, so a result
  depends only on the data, the seed and the number of resamples.
  Comparisons between cells resample the same problems for every cell
  involved, which is what makes them paired.
- Power: a quantized cell's `min_detectable_drop` is the smallest drop in pass@1
  its design (problems, samples per problem, the fp cell's pass rates) detects
  with 80% power at the 95% level (`minimum_detectable_drop`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
DEFAULT_POWER = 0.80


# --------------------------------------------------------------------------- pass@k


def _require_integers(name: str, values: np.ndarray) -> None:
    if values.dtype == bool or not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"pass_at_k: {name} must hold integers, got {values.ravel()[:5].tolist()}")


def _check_pass_at_k_args(n: np.ndarray, c: np.ndarray, k: np.ndarray) -> None:
    for name, values in (("n", n), ("c", c), ("k", k)):
        _require_integers(name, values)
    bad = (c < 0) | (c > n) | (k < 1) | (k > n)
    if np.any(bad):
        at = np.argwhere(bad)[0]
        first = tuple(int(x[tuple(at)]) for x in (n, c, k))
        raise ValueError(
            f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={first[0]}, c={first[1]}, k={first[2]}"
        )


def pass_at_k(n, c, k):
    """Unbiased pass@k estimate ``1 - C(n-c, k) / C(n, k)`` (n samples, c passing).

    Broadcasts over array arguments; returns a float for scalar input.
    The binomial ratio is evaluated as the product
    ``prod_{j<k} (n-c-j) / (n-j)`` whose factors lie in [0, 1], so no large
    binomial coefficient is ever formed and the result stays accurate for
    thousands of samples.

    >>> round(pass_at_k(10, 3, 1), 12), round(pass_at_k(4, 2, 2), 12)
    (0.3, 0.833333333333)
    """
    n, c, k = np.broadcast_arrays(*(np.asarray(x) for x in (n, c, k)))
    _check_pass_at_k_args(n, c, k)
    n, c, k = (x.astype(np.float64) for x in (n, c, k))
    all_fail = np.ones(n.shape)
    for j in range(int(k.max(initial=0))):
        active = j < k
        # Once n-c-j hits zero the product is zero: every k-subset holds a pass.
        factor = np.clip(n - c - j, 0.0, None) / np.where(active, n - j, 1.0)
        all_fail = np.where(active, all_fail * factor, all_fail)
    estimate = 1.0 - all_fail
    return float(estimate) if estimate.ndim == 0 else estimate


def pass_at_k_curve(n, c, max_k: int) -> np.ndarray:
    """pass@k for k = 1..max_k at once, shape ``(len(n), max_k)``.

    Same estimator as :func:`pass_at_k`; the factor ``(n-c-j)/(n-j)`` does not
    depend on k, so every k is one cumulative product.
    """
    n = np.asarray(n)
    c = np.asarray(c)
    _check_pass_at_k_args(n, c, np.full(n.shape, max_k))
    n = n.astype(np.float64)[:, None]
    c = c.astype(np.float64)[:, None]
    j = np.arange(max_k, dtype=np.float64)[None, :]
    factors = np.clip(n - c - j, 0.0, None) / (n - j)
    return 1.0 - np.cumprod(factors, axis=1)


# --------------------------------------------------------------------------- bootstrap


def bootstrap_weights(n_problems: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """How often each problem is drawn in each resample, shape ``(resamples, n_problems)``.

    Row b is the multiplicity vector of resample b (it sums to n_problems), so a
    bootstrap mean is a weighted mean: one matrix product serves any number of
    statistics that must share the same resampled problems.
    """
    if n_problems < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs n_problems >= 1 and resamples >= 1, got {n_problems}, {resamples}")
    draws = np.random.default_rng(seed).integers(0, n_problems, size=(resamples, n_problems))
    flat = draws + n_problems * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n_problems).reshape(resamples, n_problems)


def bootstrap_means(values, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Bootstrap distribution of the mean over the last axis (problems).

    ``values`` has shape ``(..., n_problems)``; the result has shape
    ``(..., resamples)``. Every leading row is resampled with the same problem
    draws, so rows stay paired and a row's distribution does not depend on the
    other rows in the batch.
    """
    values = np.asarray(values, dtype=np.float64)
    n_problems = values.shape[-1]
    weights = bootstrap_weights(n_problems, resamples, seed)
    return values @ weights.T / n_problems


def percentile_interval(distribution, level: float = DEFAULT_LEVEL):
    """Central ``level`` percentile interval over the last axis: (low, high)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must lie in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(distribution), [tail, 1.0 - tail], axis=-1)
    return _scalar_if_0d(low), _scalar_if_0d(high)


def bootstrap_mean_interval(values, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                            level: float = DEFAULT_LEVEL):
    """Percentile-bootstrap interval of the mean over problems (last axis).

    Returns ``(low, high)``: floats for a 1-d input, arrays of the leading
    shape otherwise.
    """
    return percentile_interval(bootstrap_means(values, resamples, seed), level)


def _scalar_if_0d(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


# --------------------------------------------------------------------------- tests


def mcnemar_exact_p(b, c):
    """Exact two-sided McNemar p-value from the discordant counts b and c.

    Under no change each discordant problem flips either way with probability
    1/2, so ``p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2))``; 1.0 when
    there is no discordant problem. Broadcasts; returns a float for scalars.
    """
    from scipy.stats import binom

    b, c = np.broadcast_arrays(np.asarray(b), np.asarray(c))
    if np.any(b < 0) or np.any(c < 0):
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got b={b.tolist()}, c={c.tolist()}")
    discordant = b + c
    p = np.minimum(1.0, 2.0 * binom.cdf(np.minimum(b, c), discordant, 0.5))
    p = np.where(discordant == 0, 1.0, p)
    return _scalar_if_0d(p)


def claim_verdict(ci_low: float, ci_high: float) -> str:
    """'supported' if the interval lies above 0, 'contradicted' if below, else 'inconclusive'."""
    if ci_low > 0:
        return "supported"
    if ci_high < 0:
        return "contradicted"
    return "inconclusive"


# --------------------------------------------------------------------------- power


def sampling_variance_per_problem(n, c) -> np.ndarray:
    """Each problem's per-sample Bernoulli variance p(1-p), estimated from its n samples with c
    passes: c(n-c) / (n(n-1)), unbiased, where every problem has two or more samples; otherwise
    (one sample tells nothing of a problem's own p) the bound P(1-P) of the cell's pass rate P,
    which the mean of p(1-p) over problems never exceeds."""
    n = np.asarray(n, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if n.size == 0 or np.any(n < 1) or np.any(c < 0) or np.any(c > n):
        raise ValueError(f"sampling variance needs 0 <= c <= n and n >= 1 per problem, got n={n[:5]}, c={c[:5]}")
    if np.all(n >= 2):
        return c * (n - c) / (n * (n - 1))
    pass_rate = float(np.mean(c / n))
    return np.full(n.shape, pass_rate * (1 - pass_rate))


def minimum_detectable_drop(fp_n, fp_c, quantized_n, power: float = DEFAULT_POWER,
                            level: float = DEFAULT_LEVEL) -> float:
    """The smallest drop in pass@1 a paired comparison of a quantized cell with its fp cell
    detects with probability `power` at two-sided significance 1 - `level`.

    Per problem i (shared by both cells) the fp cell drew fp_n[i] samples, fp_c[i] passing, and
    the quantized cell drew quantized_n[i]. Pairing by problem removes how hard each problem is;
    what remains is each cell's sampling noise. Under no change both cells pass problem i with
    the fp cell's p_i, so the estimated delta has variance

        V = sum_i p_i (1 - p_i) (1 / fp_n[i] + 1 / quantized_n[i]) / N^2

    with p_i (1 - p_i) from `sampling_variance_per_problem`, and a normal test detects a drop of
    (z_{(1+level)/2} + z_{power}) * sqrt(V) with the asked power. With one sample per problem
    this is the binomial figure: sqrt(2 P(1-P) / N) per unit of z (HumanEval, P = 0.54: 5.5
    points, so 15.5 points at 80% power); n samples divide it by sqrt(n).
    """
    from scipy.stats import norm

    if not 0 < power < 1 or not 0 < level < 1:
        raise ValueError(f"power and level must lie in (0, 1), got {power} and {level}")
    fp_n = np.asarray(fp_n, dtype=np.float64)
    quantized_n = np.asarray(quantized_n, dtype=np.float64)
    if fp_n.shape != quantized_n.shape or np.any(quantized_n < 1):
        raise ValueError("minimum_detectable_drop: fp and quantized sample counts must be >= 1 for the same problems")
    variance = sampling_variance_per_problem(fp_n, fp_c)
    delta_variance = float(np.sum(variance * (1 / fp_n + 1 / quantized_n))) / fp_n.size ** 2
    return float((norm.ppf((1 + level) / 2) + norm.ppf(power)) * np.sqrt(delta_variance))


# --------------------------------------------------------------------------- per-problem tables


def problem_outcomes(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell_id, task_id) - or per task_id for a single-cell frame.

    Columns: n (samples), c (passing samples), pass_rate (c / n) and
    first_passed (did the lowest sample_idx pass). Sorted by the keys.
    """
    keys = ["cell_id", "task_id"] if "cell_id" in samples.columns else ["task_id"]
    frame = samples[keys + ["sample_idx", "passed"]].copy()
    frame["passed"] = frame["passed"].fillna(False).astype(bool)
    frame = frame.sort_values(keys + ["sample_idx"], kind="stable")
    grouped = frame.groupby(keys, sort=True)["passed"]
    out = pd.DataFrame({
        "n": grouped.size(),
        "c": grouped.sum().astype(np.int64),
        "first_passed": grouped.first(),
    })
    out["pass_rate"] = out["c"] / out["n"]
    return out.reset_index()


def seed_spread(samples: pd.DataFrame) -> dict:
    """Seed-to-seed spread of one cell's pass@1.

    sample_idx k is the replicate drawn with seed + k, so the pass@1 of the
    samples with index k is one seed's score. Returns n_seeds and the sample
    standard deviation (ddof=1; NaN with one seed), min and max over seeds.
    """
    passed = samples["passed"].fillna(False).astype(bool)
    per_seed = passed.groupby(samples["sample_idx"]).mean()
    return {
        "n_seeds": int(per_seed.size),
        "seed_std": float(per_seed.std(ddof=1)) if per_seed.size > 1 else float("nan"),
        "seed_min": float(per_seed.min()),
        "seed_max": float(per_seed.max()),
    }


# --------------------------------------------------------------------------- one cell


def cell_pass_at_k(samples: pd.DataFrame, ks=None, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
    """Tidy pass@k table: one row per cell x k with a bootstrap interval over problems.

    ``ks`` defaults to every k from 1 to the smallest per-problem sample count
    of the cell (the ks every problem supports). Columns: cell_id (when the
    frame has one), k, n_problems, estimate, ci_low, ci_high, and for k = 1 the
    seed spread n_seeds, seed_std, seed_min, seed_max (NaN for k > 1).
    """
    if "cell_id" not in samples.columns:
        return _one_cell_pass_at_k(samples, ks, resamples, seed, level)
    frames = [
        _one_cell_pass_at_k(cell, ks, resamples, seed, level).assign(cell_id=cell_id)
        for cell_id, cell in samples.groupby("cell_id", sort=True)
    ]
    columns = ["cell_id"] + _PASS_AT_K_COLUMNS
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


_PASS_AT_K_COLUMNS = ["k", "n_problems", "estimate", "ci_low", "ci_high",
                      "n_seeds", "seed_std", "seed_min", "seed_max"]


def _one_cell_pass_at_k(samples, ks, resamples, seed, level) -> pd.DataFrame:
    problems = problem_outcomes(samples)
    if problems.empty:
        raise ValueError("cell_pass_at_k: the cell has no samples")
    max_supported = int(problems["n"].min())
    ks = np.arange(1, max_supported + 1) if ks is None else np.asarray(sorted(set(ks)), dtype=np.int64)
    if ks.size == 0 or ks.min() < 1 or ks.max() > max_supported:
        raise ValueError(f"cell_pass_at_k: ks must lie in 1..{max_supported} (fewest samples of a problem)")
    curve = pass_at_k_curve(problems["n"].to_numpy(), problems["c"].to_numpy(), int(ks.max()))
    per_problem = curve[:, ks - 1].T  # (len(ks), n_problems)
    low, high = percentile_interval(bootstrap_means(per_problem, resamples, seed), level)
    table = pd.DataFrame({
        "k": ks.astype(np.int64),
        "n_problems": len(problems),
        "estimate": per_problem.mean(axis=1),
        "ci_low": np.atleast_1d(low),
        "ci_high": np.atleast_1d(high),
    })
    spread = seed_spread(samples)
    for name, value in spread.items():
        table[name] = np.where(table["k"] == 1, value, np.nan)
    return table[_PASS_AT_K_COLUMNS]


REPORTED_KS = (1, 5, 10, 20, 50, 100)


def pass_at_k_table(verdicts, ks=REPORTED_KS) -> dict[int, float]:
    """pass@k point estimates of one cell from verdict records, ``{k: estimate}``.

    ``verdicts`` is an iterable of mappings with task_id, sample_idx and passed
    (as a sandbox judge returns them). Only the ks that every problem supports
    (k <= its number of samples) are returned.
    """
    problems = problem_outcomes(pd.DataFrame(list(verdicts), columns=["task_id", "sample_idx", "passed"]))
    if problems.empty:
        return {}
    fewest = int(problems["n"].min())
    n, c = problems["n"].to_numpy(), problems["c"].to_numpy()
    return {int(k): float(np.mean(pass_at_k(n, c, k))) for k in sorted(ks) if 1 <= k <= fewest}


# --------------------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class Degradation:
    """A quantized cell against the same model's fp cell, on their common problems."""

    n_problems: int
    fp_pass_at_1: float
    pass_at_1: float
    delta_pass_at_1: float  # quantized - fp; negative = accuracy lost
    delta_ci_low: float
    delta_ci_high: float
    relative_degradation: float  # delta / fp pass@1; NaN when fp pass@1 is 0
    flips_pass_to_fail: int  # solved in fp, not when quantized (first-sample outcome)
    flips_fail_to_pass: int
    mcnemar_p: float
    min_detectable_drop: float  # the design's 80%-power drop (`minimum_detectable_drop`)


@dataclass(frozen=True)
class Claim:
    """Difference of degradations D = diffusion delta - AR delta (positive = diffusion degrades less)."""

    n_problems: int
    diffusion_delta: float
    ar_delta: float
    difference: float
    ci_low: float
    ci_high: float
    verdict: str


def _aligned_outcomes(*cells: pd.DataFrame) -> list[pd.DataFrame]:
    """Per-problem outcomes of each cell restricted to the problems all cells share, same order."""
    outcomes = [problem_outcomes(cell).set_index("task_id") for cell in cells]
    common = outcomes[0].index
    for other in outcomes[1:]:
        common = common.intersection(other.index)
    if len(common) == 0:
        raise ValueError("the cells share no problems (task_id)")
    common = common.sort_values()
    return [o.loc[common] for o in outcomes]


def degradation(fp_samples: pd.DataFrame, quantized_samples: pd.DataFrame,
                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                level: float = DEFAULT_LEVEL) -> Degradation:
    """Paired degradation of a quantized cell vs its fp cell (samples frames of one cell each)."""
    fp, quant = _aligned_outcomes(fp_samples, quantized_samples)
    fp_rate = fp["pass_rate"].to_numpy()
    q_rate = quant["pass_rate"].to_numpy()
    # The mean is linear, so resampling the per-problem difference is exactly
    # resampling both cells with the same problem indices.
    low, high = bootstrap_mean_interval(q_rate - fp_rate, resamples, seed, level)
    fp_first = fp["first_passed"].to_numpy(dtype=bool)
    q_first = quant["first_passed"].to_numpy(dtype=bool)
    pass_to_fail = int(np.sum(fp_first & ~q_first))
    fail_to_pass = int(np.sum(~fp_first & q_first))
    fp_pass_at_1 = float(fp_rate.mean())
    delta = float(q_rate.mean()) - fp_pass_at_1
    return Degradation(
        n_problems=len(fp_rate),
        fp_pass_at_1=fp_pass_at_1,
        pass_at_1=float(q_rate.mean()),
        delta_pass_at_1=delta,
        delta_ci_low=low,
        delta_ci_high=high,
        relative_degradation=delta / fp_pass_at_1 if fp_pass_at_1 > 0 else float("nan"),
        flips_pass_to_fail=pass_to_fail,
        flips_fail_to_pass=fail_to_pass,
        mcnemar_p=mcnemar_exact_p(pass_to_fail, fail_to_pass),
        min_detectable_drop=minimum_detectable_drop(fp["n"].to_numpy(), fp["c"].to_numpy(), quant["n"].to_numpy()),
    )


def claim(diffusion_fp: pd.DataFrame, diffusion_quantized: pd.DataFrame,
          ar_fp: pd.DataFrame, ar_quantized: pd.DataFrame,
          resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
          level: float = DEFAULT_LEVEL) -> Claim:
    """Does the diffusion model lose less pass@1 than the AR model under the same quantization?

    All four cells are restricted to the problems they share and resampled
    jointly (one problem draw for all four), so the interval of D accounts for
    both models seeing the same problems.
    """
    d_fp, d_q, a_fp, a_q = _aligned_outcomes(diffusion_fp, diffusion_quantized, ar_fp, ar_quantized)
    d_delta = d_q["pass_rate"].to_numpy() - d_fp["pass_rate"].to_numpy()
    a_delta = a_q["pass_rate"].to_numpy() - a_fp["pass_rate"].to_numpy()
    low, high = bootstrap_mean_interval(d_delta - a_delta, resamples, seed, level)
    return Claim(
        n_problems=len(d_delta),
        diffusion_delta=float(d_delta.mean()),
        ar_delta=float(a_delta.mean()),
        difference=float(d_delta.mean() - a_delta.mean()),
        ci_low=low,
        ci_high=high,
        verdict=claim_verdict(low, high),
    )


def cell_result(checkpoint, generated_shards: list, samples: list):
    """A finished cell's summary row: pass@1 (the mean over problems of each problem's pass
    rate), the checkpoint's size and bits, and the generation's time, tokens/s and peak memory."""
    from qrobust.tasks.artifacts import CellResult

    per_problem: dict[str, list[bool]] = {}
    for sample in samples:
        per_problem.setdefault(sample.task_id, []).append(sample.passed)
    gen_seconds = sum(g.gen_seconds for g in generated_shards)
    gen_tokens = sum(g.gen_tokens for g in generated_shards)
    return CellResult(
        avg_bits=checkpoint.avg_bits if checkpoint is not None else None,
        n_problems=len(per_problem),
        n_samples=max((len(v) for v in per_problem.values()), default=0),
        pass_at_1=sum(sum(v) / len(v) for v in per_problem.values()) / max(len(per_problem), 1),
        model_bytes=max((g.model_bytes for g in generated_shards if g.model_bytes is not None), default=None),
        peak_mem_bytes=max((g.peak_mem_bytes for g in generated_shards), default=None),
        gen_tokens_per_s=gen_tokens / gen_seconds if gen_seconds else None,
        gen_seconds=gen_seconds,
        quantize_seconds=checkpoint.quantize_seconds if checkpoint is not None else None,
        warmup_seconds=sum(g.warmup_seconds for g in generated_shards),
        kernel=",".join(sorted({g.kernel for g in generated_shards})) or None,
    )
