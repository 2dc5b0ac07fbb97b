"""Report stage: reads the store and writes report.md and a self-contained report.html.

Sections are functions of a read-only DuckDB connection that return markdown and figures,
so adding a section is one function and one line in `SECTIONS`. A section returns None when
it has nothing to say (it is then left out); every section copes with an empty or partial
store, including one whose statistics views were never created.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from qrobust.tasks.config import DEFAULT_HARNESS
from qrobust.tasks.methods import BASELINE, method_class, mixed_precision_methods, plot_style

# pass@k columns shown beside pass@1 when the cells have enough samples per problem.
REPORTED_KS = (5, 10, 20, 50, 100)
# Module kinds in the order of a decoder layer; anything else is appended after them.
MODULE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
NONE = "_none_\n"
STATS_MISSING = "_statistics not computed for this store (they are refreshed at the end of `qrobust run`)_\n"


@dataclass
class Section:
    title: str
    markdown: str
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, png bytes)


# --------------------------------------------------------------------------- helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def markdown_table(df) -> str:
    if df.empty:
        return NONE
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def _cell_text(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _missing(value) -> bool:
    import pandas as pd

    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and other containers are never "missing"
        return False


def _number(value, digits: int = 3) -> str:
    return "" if _missing(value) else f"{float(value):.{digits}f}"


def _interval(low, high, digits: int = 3) -> str:
    if _missing(low) or _missing(high):
        return ""
    return f"[{float(low):.{digits}f}, {float(high):.{digits}f}]"


def setting_label(method: str, bits, budget) -> str:
    """How a cell's quantization reads in tables and legends: 'fp', 'gptq 4-bit', 'hawq 2.5 bits avg'."""
    if not _missing(budget):
        return f"{method} {float(budget):g} bits avg"
    if not _missing(bits):
        return f"{method} {int(bits)}-bit"
    return str(method)


def _has_relations(con, *names: str) -> bool:
    present = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return all(name in present for name in names)


def _has_columns(con, table: str, *columns: str) -> bool:
    present = {row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
    return all(column in present for column in columns)


def _family_of(con) -> dict[str, str]:
    if not _has_relations(con, "runs"):
        return {}
    return dict(con.execute("SELECT model, any_value(family) FROM runs GROUP BY model").fetchall())


def model_colours(families: dict[str, str]) -> dict[str, tuple]:
    """A colour per model: blues for AR models, oranges for diffusion models, greys otherwise.

    Family-tinted colours let a reader tell the two families apart at a glance on plots
    that mix them, while models of one family stay distinguishable by shade.
    """
    plt = _pyplot()
    maps = {"ar": plt.get_cmap("Blues"), "diffusion": plt.get_cmap("Oranges")}
    colours = {}
    for family in sorted(set(families.values()), key=str):
        members = sorted(m for m, f in families.items() if f == family)
        cmap = maps.get(family, plt.get_cmap("Greys"))
        for i, model in enumerate(members):
            colours[model] = cmap(0.85 - 0.45 * i / max(len(members) - 1, 1))
    return colours


def pareto_front(x, y) -> list[int]:
    """Indices of the points no other point beats: lower or equal x with higher y.

    Returned in increasing x, so they can be drawn as a step line.
    """
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -math.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def _bits_axis(ax, bits_values) -> None:
    """Log2 bit axis: 2, 3, 4, 8 and 16 bits get comparable room.

    Ticks sit at whole bit widths only: fractional HAWQ averages would crowd them.
    """
    from matplotlib.ticker import NullLocator

    ticks = sorted({round(float(b)) for b in bits_values if not _missing(b) and float(b) >= 1})
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _pass_at_1_points(con):
    """One row per reported cell: pass@1 with its bootstrap interval (when computed) and its costs."""
    if not _has_relations(con, "results"):
        return None
    if _has_relations(con, "cell_pass_at_k"):
        interval = ("LEFT JOIN (SELECT cell_id, estimate, ci_low, ci_high FROM cell_pass_at_k WHERE k = 1) p "
                    "USING (cell_id)")
        columns = "coalesce(p.estimate, r.pass_at_1) AS pass_at_1, p.ci_low, p.ci_high"
    else:
        interval, columns = "", "r.pass_at_1, NULL::DOUBLE AS ci_low, NULL::DOUBLE AS ci_high"
    harness = "r.harness" if _has_columns(con, "results", "harness") else "NULL::VARCHAR AS harness"
    return con.execute(
        f"""
        SELECT r.cell_id, r.model, r.family, r.method, r.bits, r.budget, {harness},
               CASE WHEN r.method = '{BASELINE}' THEN coalesce(r.avg_bits, 16.0) ELSE coalesce(r.avg_bits, r.bits, r.budget) END
                   AS avg_bits,
               r.benchmark, r.n_problems, r.n_samples, {columns},
               r.model_bytes, r.gen_tokens_per_s,
               r.gen_seconds / nullif(r.n_problems * greatest(r.n_samples, 1), 0) AS seconds_per_sample
        FROM results r {interval}
        ORDER BY r.model, r.benchmark, r.method, avg_bits
        """
    ).df()


def _panels(n: int, width: float = 5.5, height: float = 4.0):
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


# --------------------------------------------------------------------------- 1. overview


def overview_section(con) -> Section:
    if not _has_relations(con, "runs"):
        return Section("overview", NONE)
    models = con.execute(
        """
        SELECT model, any_value(family) AS family,
               count(*) FILTER (WHERE status = 'done') AS cells_done,
               count(*) FILTER (WHERE status = 'failed') AS cells_failed,
               bool_or(json_extract(config_json, '$.cell.model.training') IS NOT NULL
                       AND json_type(json_extract(config_json, '$.cell.model.training')) <> 'NULL') AS trained
        FROM runs GROUP BY model ORDER BY family, model
        """
    ).df()
    if models.empty:
        return Section("overview", NONE)
    parts = [_tiny_model_note(models)] if models["model"].str.startswith("tiny-").any() else []
    table = models.assign(tiny_demo=models["model"].str.startswith("tiny-").map({True: "yes", False: ""}))
    parts.append(markdown_table(table.drop(columns="trained")))
    return Section("overview", "\n".join(parts))


def _tiny_model_note(models) -> str:
    tiny = models[models["model"].str.startswith("tiny-")]
    trained = [m for m, t in zip(tiny["model"], tiny["trained"]) if t]
    untrained = [m for m, t in zip(tiny["model"], tiny["trained"]) if not t]
    how = []
    if trained:
        how.append(f"trained on their own test problems: {', '.join(trained)}")
    if untrained:
        how.append(f"untrained, random weights: {', '.join(untrained)}")
    names = list(tiny["model"])
    what = "is a tiny model" if len(names) == 1 else "are tiny models"
    return (
        f"**Demo models:** {', '.join(names)} {what} the project builds itself "
        f"({'; '.join(how)}). Their numbers exercise the pipeline and are not a claim about real models.\n"
    )


# --------------------------------------------------------------------------- 2. pass@k per cell


def pass_at_k_section(con) -> Section:
    title = "pass@1 per cell with 95% bootstrap intervals"
    points = _pass_at_1_points(con)
    if points is None or points.empty:
        return Section(title, NONE)
    larger = _larger_pass_at_k(con)
    table = points.assign(setting=[setting_label(*r) for r in zip(points["method"], points["bits"], points["budget"])])
    table["pass@1"] = table["pass_at_1"].map(_number)
    table["95% CI"] = [_interval(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])]
    columns = ["model", "benchmark", "setting", "avg_bits", "n_problems", "n_samples", "pass@1", "95% CI"]
    if (table["harness"].fillna(DEFAULT_HARNESS) != DEFAULT_HARNESS).any():
        columns.insert(3, "harness")
    if (table["n_samples"].fillna(1) > 1).any():
        spread = _seed_spread(con)
        table["seed std"] = table["cell_id"].map(spread).map(_number)
        columns.append("seed std")
    for k in sorted(larger):
        table[f"pass@{k}"] = table["cell_id"].map(larger[k])
        columns.append(f"pass@{k}")
    table["avg_bits"] = table["avg_bits"].map(lambda b: _number(b, 2))
    note = "" if _has_relations(con, "cell_pass_at_k") else STATS_MISSING + "\n"
    if larger:
        note += "pass@k for k > 1 uses the unbiased estimator over each problem's samples, with its 95% interval.\n\n"
    return Section(title, note + markdown_table(table[columns]))


def _larger_pass_at_k(con) -> dict[int, dict[str, str]]:
    """{k: {cell_id: 'estimate [low, high]'}} for the reported ks > 1 that some cell supports."""
    if not _has_relations(con, "cell_pass_at_k"):
        return {}
    ks = ", ".join(map(str, REPORTED_KS))
    rows = con.execute(f"SELECT k, cell_id, estimate, ci_low, ci_high FROM cell_pass_at_k WHERE k IN ({ks})").fetchall()
    out: dict[int, dict[str, str]] = {}
    for k, cell_id, estimate, low, high in rows:
        out.setdefault(int(k), {})[cell_id] = f"{_number(estimate)} {_interval(low, high)}".strip()
    return out


def _seed_spread(con) -> dict[str, float]:
    if not _has_relations(con, "cell_pass_at_k"):
        return {}
    return dict(con.execute("SELECT cell_id, seed_std FROM cell_pass_at_k WHERE k = 1").fetchall())


# --------------------------------------------------------------------------- published baselines


def published_baselines_section(con) -> Section | None:
    """Each fp cell beside the score its model's authors published for the benchmark."""
    title = "full precision against published scores"
    if not _has_relations(con, "published_scores", "results"):
        return None
    published = con.execute("SELECT * FROM published_scores ORDER BY model, benchmark").df()
    if published.empty:
        return None
    points = _pass_at_1_points(con)
    fp = points[points["method"] == BASELINE].merge(published.rename(columns={"pass_at_1": "published"}),
                                                    on=["model", "benchmark"])
    text = ("Each full-precision cell beside the pass@1 its model's authors published, with the cell's 95% "
            "bootstrap interval over problems; 'outside' marks a cell whose interval excludes the published value "
            "(the setup then differs from the published one, or the published number is off). The harness column "
            "says whether the cell reproduced the published harness (coda-published) or ran rows independently.\n\n")
    if fp.empty:
        return Section(title, text + NONE)
    import pandas as pd

    table = pd.DataFrame({
        "model": fp["model"],
        "benchmark": fp["benchmark"],
        "harness": fp["harness"].fillna(""),
        "n_problems": fp["n_problems"],
        "n_samples": fp["n_samples"],
        "pass@1": fp["pass_at_1"].map(_number),
        "95% CI": [_interval(lo, hi) for lo, hi in zip(fp["ci_low"], fp["ci_high"])],
        "published": fp["published"].map(_number),
        "difference": (fp["pass_at_1"] - fp["published"]).map(_number),
        "published value": [_inside_interval(v, lo, hi) for v, lo, hi in zip(fp["published"], fp["ci_low"],
                                                                                fp["ci_high"])],
        "source": fp["source"],
    })
    return Section(title, text + markdown_table(table))


def _inside_interval(value, low, high) -> str:
    if _missing(low) or _missing(high):
        return "no interval"
    return "inside" if float(low) <= float(value) <= float(high) else "**outside**"


# --------------------------------------------------------------------------- 3. accuracy vs bits


def accuracy_vs_bits_section(con) -> Section:
    title = "accuracy against average bits"
    points = _pass_at_1_points(con)
    if points is None or points.empty:
        return Section(title, NONE)
    text = (
        "pass@1 against the average bits per quantized weight, one panel per benchmark; bands are 95% bootstrap "
        "intervals. Uniform GPTQ: circles, solid; RTN: squares, dotted; HAWQ budgets: triangles, dashed; "
        "fp: a star at its bits with a dotted horizontal reference line.\n"
    )
    figure = _accuracy_vs_bits_plot(points, model_colours(_family_of(con)))
    return Section(title, text, [("pass@1 against average bits, per model and method", figure)])


def _accuracy_vs_bits_plot(points, colours, methods=None) -> bytes:
    benchmarks = sorted(points["benchmark"].unique())
    fig, axes = _panels(len(benchmarks))
    for ax, benchmark in zip(axes, benchmarks):
        part = points[points["benchmark"] == benchmark]
        for (model, method), group in part.groupby(["model", "method"], sort=True):
            if methods is not None and method not in methods and method != BASELINE:
                continue
            _draw_method_curve(ax, group.sort_values("avg_bits"), model, method, colours.get(model))
        ax.set_title(benchmark)
        _bits_axis(ax, part["avg_bits"])
        ax.set_xlabel("average bits per quantized weight (log scale)")
        ax.set_ylabel("pass@1")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _draw_method_curve(ax, group, model, method, colour) -> None:
    x, y = group["avg_bits"].astype(float), group["pass_at_1"].astype(float)
    if method == BASELINE:  # the reference line
        ax.axhline(y.iloc[0], color=colour, linestyle=":", linewidth=1)
        ax.plot(x, y, "*", color=colour, markersize=11, label=f"{model} {BASELINE}")
        return
    marker, line = plot_style(method)
    ax.plot(x, y, marker=marker, linestyle=line, color=colour, label=f"{model} {method}")
    low, high = group["ci_low"].astype(float), group["ci_high"].astype(float)
    if low.notna().all() and len(group) > 1:
        ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
    elif low.notna().all():
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt="none", ecolor=colour, capsize=3)


# --------------------------------------------------------------------------- 4. degradation


def degradation_section(con) -> Section:
    title = "degradation against fp"
    if not _has_relations(con, "degradation"):
        return Section(title, STATS_MISSING)
    df = con.execute(
        "SELECT * FROM degradation ORDER BY benchmark, family, model, method, avg_bits DESC"
    ).df()
    if df.empty:
        return Section(title, NONE)
    text = (
        "delta = quantized pass@1 - fp pass@1 on the problems both cells have (negative = accuracy lost), with its "
        "paired 95% bootstrap interval; flips count problems whose first sample changed outcome; McNemar p is the "
        "exact two-sided test on those flips. MDE is the smallest drop the cell's design (its problems, samples per "
        "problem and the fp cell's pass rates) detects with 80% power at the 95% level: a drop smaller than it is "
        "one this design could easily have missed, and a delta inside +-MDE says little either way.\n\n"
    )
    figure = _degradation_plot(df, model_colours(_family_of(con)))
    return Section(title, text + markdown_table(_degradation_table(df)),
                   [("delta pass@1 against average bits, AR and diffusion models together", figure)])


def _degradation_table(df):
    import pandas as pd

    return pd.DataFrame({
        "model": df["model"],
        "family": df["family"],
        "benchmark": df["benchmark"],
        "setting": [setting_label(*r) for r in zip(df["method"], df["bits"], df["budget"])],
        "avg_bits": df["avg_bits"].map(lambda b: _number(b, 2)),
        "n_problems": df["n_problems"],
        "fp pass@1": df["fp_pass_at_1"].map(_number),
        "pass@1": df["pass_at_1"].map(_number),
        "delta": df["delta_pass_at_1"].map(_number),
        "95% CI": [_interval(lo, hi) for lo, hi in zip(df["delta_ci_low"], df["delta_ci_high"])],
        "pass->fail": df["flips_pass_to_fail"],
        "fail->pass": df["flips_fail_to_pass"],
        "McNemar p": df["mcnemar_p"].map(lambda p: "" if _missing(p) else f"{p:.3g}"),
        # a store whose views predate the column shows it empty until the next statistics refresh
        "MDE (80%)": df.get("min_detectable_drop", pd.Series([None] * len(df), index=df.index)).map(_number),
    })


def _degradation_plot(df, colours) -> bytes:
    benchmarks = sorted(df["benchmark"].unique())
    fig, axes = _panels(len(benchmarks))
    for ax, benchmark in zip(axes, benchmarks):
        part = df[df["benchmark"] == benchmark]
        for (model, family, method), group in part.groupby(["model", "family", "method"], sort=True):
            group = group.sort_values("avg_bits")
            x, y = group["avg_bits"].astype(float), group["delta_pass_at_1"].astype(float)
            low, high = group["delta_ci_low"].astype(float), group["delta_ci_high"].astype(float)
            marker, line = plot_style(method)
            errors = None if low.isna().any() else [(y - low).clip(lower=0), (high - y).clip(lower=0)]
            ax.errorbar(x, y, yerr=errors, marker=marker, linestyle=line, color=colours.get(model), capsize=3,
                        label=f"{model} ({family}) {method}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(benchmark)
        _bits_axis(ax, part["avg_bits"])
        ax.set_xlabel("average bits per quantized weight (log scale)")
        ax.set_ylabel("delta pass@1 vs fp")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


# --------------------------------------------------------------------------- 5. frontiers


def frontier_section(con) -> Section:
    title = "accuracy-memory and accuracy-latency frontiers"
    points = _pass_at_1_points(con)
    if points is None or points.empty:
        return Section(title, NONE)
    colours = model_colours(_family_of(con))
    figures = []
    memory = points.dropna(subset=["model_bytes"]).assign(megabytes=lambda d: d["model_bytes"].astype(float) / 1e6)
    if not memory.empty:
        figures.append(("pass@1 against model size with each model's Pareto frontier",
                        _frontier_plot(memory, "megabytes", "model size (MB, log scale)", colours)))
    latency = points.dropna(subset=["seconds_per_sample"])
    if not latency.empty:
        figures.append(("pass@1 against generation seconds per sample with each model's Pareto frontier",
                        _frontier_plot(latency, "seconds_per_sample", "generation seconds per sample (log scale)",
                                       colours)))
    if not figures:
        return Section(title, "_no cell recorded its model size or generation time_\n")
    text = (
        "Each point is a cell (fp, RTN, uniform GPTQ, HAWQ budgets); the step line joins a model's Pareto-optimal "
        "cells: none of its other cells is both smaller (or faster) and more accurate.\n\n"
    )
    return Section(title, text + markdown_table(_frontier_table(points)), figures)


def _frontier_plot(points, x_column: str, x_label: str, colours) -> bytes:
    benchmarks = sorted(points["benchmark"].unique())
    fig, axes = _panels(len(benchmarks))
    for ax, benchmark in zip(axes, benchmarks):
        part = points[points["benchmark"] == benchmark]
        for model, group in part.groupby("model", sort=True):
            colour = colours.get(model)
            for method, cells in group.groupby("method", sort=True):
                marker = "*" if method == BASELINE else plot_style(method)[0]
                ax.plot(cells[x_column], cells["pass_at_1"], marker, color=colour, linestyle="none",
                        label=f"{model} {method}")
            x, y = group[x_column].astype(float).tolist(), group["pass_at_1"].astype(float).tolist()
            front = pareto_front(x, y)
            # The frontier holds up to the largest cell, so a one-point frontier still shows as a line.
            front_x, front_y = [x[i] for i in front] + [max(x)], [y[i] for i in front] + [y[front[-1]]]
            ax.step(front_x, front_y, where="post", color=colour, alpha=0.7)
        _plain_log_axis(ax)
        ax.set_title(benchmark)
        ax.set_xlabel(x_label)
        ax.set_ylabel("pass@1")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _plain_log_axis(ax) -> None:
    """Log x axis labelled 0.3, 1, 20 rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # Minor ticks at 2x and 5x only: labelling all of them overlaps within a decade.
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def _frontier_table(points):
    """The cells on some model's memory or latency frontier, per benchmark."""
    import pandas as pd

    rows = []
    for (model, benchmark), group in points.groupby(["model", "benchmark"], sort=True):
        group = group.reset_index(drop=True)
        on_memory = _front_members(group, "model_bytes")
        on_latency = _front_members(group, "seconds_per_sample")
        for i, cell in group.iterrows():
            if i in on_memory or i in on_latency:
                rows.append({
                    "model": model, "benchmark": benchmark,
                    "setting": setting_label(cell["method"], cell["bits"], cell["budget"]),
                    "pass@1": _number(cell["pass_at_1"]),
                    "MB": _number(cell["model_bytes"] / 1e6 if not _missing(cell["model_bytes"]) else None, 2),
                    "s/sample": _number(cell["seconds_per_sample"]),
                    "tokens/s": _number(cell["gen_tokens_per_s"], 1),
                    "memory frontier": "yes" if i in on_memory else "",
                    "latency frontier": "yes" if i in on_latency else "",
                })
    return pd.DataFrame(rows)


def _front_members(group, x_column: str) -> set[int]:
    known = group.dropna(subset=[x_column])
    if known.empty:
        return set()
    front = pareto_front(known[x_column].astype(float).tolist(), known["pass_at_1"].astype(float).tolist())
    return {int(known.index[i]) for i in front}


# --------------------------------------------------------------------------- 6. claim


def claim_section(con) -> Section:
    title = "claim: does the diffusion model degrade less than its AR partner?"
    matching = _pair_matching_markdown(con)
    if not _has_relations(con, "claim"):
        return Section(title, matching + STATS_MISSING)
    df = con.execute("SELECT * FROM claim ORDER BY benchmark, diffusion_model, ar_model, method, bits, budget").df()
    if df.empty:
        return Section(title, matching + NONE)
    rule = (
        "D = diffusion delta - AR delta (positive: the diffusion model loses less pass@1). The verdict is "
        "*supported* when the whole 95% bootstrap interval of D lies above 0, *contradicted* when it lies below 0, "
        "and *inconclusive* otherwise.\n\n"
        f"**Warning:** these are {len(df)} separate comparisons with no multiple-comparison correction; with many "
        "settings about 1 in 20 will show a verdict by chance even if there is no real difference.\n\n"
    )
    counts = df["verdict"].fillna("not computed").value_counts()
    summary = "Verdicts: " + ", ".join(f"{verdict} {n}" for verdict, n in sorted(counts.items())) + ".\n\n"
    return Section(title, matching + rule + summary + markdown_table(_claim_table(df)))


def _pair_matching_markdown(con) -> str:
    """What each declared pair holds equal, one line per pair and the facts table; a verdict
    speaks to the objective only where everything else is the same."""
    if not _has_relations(con, "pair_matching"):
        return ""
    df = con.execute("SELECT * FROM pair_matching ORDER BY diffusion_model, ar_model, attribute_order").df()
    if df.empty:
        return ""
    import pandas as pd

    lines = []
    for (diffusion, ar), facts in df.groupby(["diffusion_model", "ar_model"], sort=False):
        parts = []
        for verdict, label in (("same", "same"), ("differs", "differ"), ("unknown", "unknown")):
            attributes = facts.loc[facts["verdict"] == verdict, "attribute"].tolist()
            if attributes:
                parts.append(f"{label}: {', '.join(attributes)}")
        evaluation = facts.loc[facts["attribute"] == "evaluation settings", "verdict"].tolist()
        if evaluation and evaluation[0] not in ("same", "differs", "unknown"):
            parts.append(f"evaluation settings: {evaluation[0]}")
        lines.append(f"- **{diffusion}** against **{ar}**: {'; '.join(parts)}.")
    table = pd.DataFrame({
        "diffusion model": df["diffusion_model"], "AR model": df["ar_model"], "attribute": df["attribute"],
        "diffusion": df["diffusion_value"], "AR": df["ar_value"], "verdict": df["verdict"],
    })
    intro = ("What each pair holds equal. A verdict below speaks to the training objective only as far as "
             "the pair is matched; where an attribute differs, that difference is part of the comparison.\n\n")
    return intro + "\n".join(lines) + "\n\n" + markdown_table(table) + "\n"


def _claim_table(df):
    import pandas as pd

    return pd.DataFrame({
        "diffusion model": df["diffusion_model"],
        "AR model": df["ar_model"],
        "benchmark": df["benchmark"],
        "setting": [setting_label(*r) for r in zip(df["method"], df["bits"], df["budget"])],
        "n_problems": df["n_problems"],
        "diffusion delta": df["diffusion_delta"].map(_number),
        "AR delta": df["ar_delta"].map(_number),
        "difference D": df["difference"].map(_number),
        "95% CI": [_interval(lo, hi) for lo, hi in zip(df["ci_low"], df["ci_high"])],
        "verdict": df["verdict"].fillna("not computed"),
    })


# --------------------------------------------------------------------------- 7. HAWQ


def module_position(module: str) -> tuple[int | None, str]:
    """(decoder layer index, module kind) of a weight name: 'model.layers.3.mlp.up_proj' -> (3, 'up')."""
    layer = re.search(r"layers\.(\d+)\.", module)
    kind = module.rsplit(".", 1)[-1]
    kind = kind[: -len("_proj")] if kind.endswith("_proj") else kind
    return (int(layer.group(1)) if layer else None, kind)


def hawq_allocation_section(con) -> Section | None:
    if not _has_relations(con, "layer_bits", "runs"):
        return None
    df = con.execute(
        """
        SELECT r.model, r.budget, r.benchmark, b.module, b.bits
        FROM layer_bits b JOIN runs r USING (cell_id)
        WHERE list_contains(?, r.method) AND r.status = 'done'
        ORDER BY r.model, r.budget, r.benchmark
        """, [list(mixed_precision_methods())]
    ).df()
    title = "HAWQ per-layer bit allocation"
    if df.empty:
        return Section(title, NONE)
    figures, notes = [], []
    for (model, budget), part in df.groupby(["model", "budget"], sort=True):
        allocation, differs = _one_allocation(part)
        if differs:
            notes.append(f"{model} at {budget:g} bits: benchmarks got different allocations; showing {differs}.")
        figures.append((f"bit allocation of {model} at a {budget:g}-bit HAWQ budget",
                        _allocation_heatmap(allocation, f"{model}, HAWQ budget {budget:g} bits")))
    text = ("Bits chosen per decoder layer (rows) and module kind (columns), one heatmap per model and budget; "
            "the allocation depends on the model and budget only, so benchmarks share it.\n")
    return Section(title, text + "".join(f"\n{n}\n" for n in notes), figures)


def _one_allocation(part):
    """The allocation of one model x budget; if benchmarks disagree (they should not), the first and its name."""
    by_benchmark = {b: frame[["module", "bits"]].sort_values("module").reset_index(drop=True)
                    for b, frame in part.groupby("benchmark", sort=True)}
    first_name, first = next(iter(by_benchmark.items()))
    agree = all(first.equals(other) for other in by_benchmark.values())
    return first, (None if agree else first_name)


def _allocation_heatmap(allocation, title: str) -> bytes:
    import numpy as np

    plt = _pyplot()
    positions = [module_position(m) for m in allocation["module"]]
    layers = sorted({layer for layer, _ in positions if layer is not None})
    kinds = [k for k in MODULE_KINDS if k in {kind for _, kind in positions}]
    kinds += sorted({kind for _, kind in positions} - set(kinds))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), bits in zip(positions, allocation["bits"]):
        if layer is not None:
            grid[layers.index(layer), kinds.index(kind)] = bits
    from matplotlib.colors import BoundaryNorm

    levels = sorted({float(b) for b in allocation["bits"]})
    # One colour per bit width actually used, so a 3-bit block never looks like a 2/4 blend.
    norm = BoundaryNorm([b - 0.5 for b in levels] + [levels[-1] + 0.5], ncolors=256)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(kinds), 1.2 + 0.3 * max(len(layers), 2)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    if len(layers) * len(kinds) <= 400:  # numbers stay legible only on small grids
        middle = (levels[0] + levels[-1]) / 2
        for (row, col), bits in np.ndenumerate(grid):
            if not np.isnan(bits):
                ax.text(col, row, f"{bits:g}", ha="center", va="center", fontsize=7,
                        color="black" if bits > middle else "white")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module kind")
    ax.set_ylabel("decoder layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="bits", ticks=levels)
    return _png(fig)


def layer_sensitivity_section(con) -> Section | None:
    if not _has_relations(con, "layer_sensitivity"):
        return None
    df = con.execute(
        "SELECT model, estimator, module, layer, trace / nullif(n_params, 0) AS trace_per_param "
        "FROM layer_sensitivity WHERE layer IS NOT NULL ORDER BY model, estimator, layer"
    ).df()
    title = "HAWQ layer sensitivity: Hessian trace per parameter"
    if df.empty:
        return Section(title, NONE)
    families = _family_of(con)
    figures = [
        (f"per-layer Hessian trace per parameter ({estimator}), AR and diffusion models side by side",
         _trace_plot(part, families))
        for estimator, part in df.groupby("estimator", sort=True)
    ]
    text = ("Hessian trace / parameters of every quantized module per decoder layer, one panel per model (AR models "
            "first, then diffusion), shared symmetric-log y axis.")
    if (df["trace_per_param"] < 0).any():
        text += (" Some traces are negative (the estimate is noisy and the loss need not be locally convex, "
                 "typical of untrained models); the symlog axis shows them below zero.")
    return Section(title, text + "\n", figures)


def _trace_plot(df, families) -> bytes:
    import numpy as np

    models = sorted(df["model"].unique(), key=lambda m: (families.get(m, "") != "ar", families.get(m, ""), m))
    fig, axes = _panels(len(models), width=5.0)
    magnitudes = np.abs(df["trace_per_param"].dropna().to_numpy())
    # Linear band around 0 of about the smallest typical magnitude, so sign changes stay visible.
    linthresh = float(np.percentile(magnitudes[magnitudes > 0], 10)) if (magnitudes > 0).any() else 1.0
    from matplotlib.ticker import MaxNLocator

    for ax, model in zip(axes, models):
        part = df[df["model"] == model]
        part = part.assign(kind=[module_position(m)[1] for m in part["module"]])
        for kind in [k for k in MODULE_KINDS if k in set(part["kind"])] + sorted(set(part["kind"]) - set(MODULE_KINDS)):
            rows = part[part["kind"] == kind].sort_values("layer")
            ax.plot(rows["layer"], rows["trace_per_param"], marker="o", markersize=3, label=kind)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(f"{model} ({families.get(model, '?')})")
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("trace / n_params (symlog)")
    if len(axes) > 1:
        low, high = min(a.get_ylim()[0] for a in axes), max(a.get_ylim()[1] for a in axes)
        for ax in axes:
            ax.set_ylim(low, high)
    return _png(fig)


def hawq_vs_gptq_section(con) -> Section | None:
    points = _pass_at_1_points(con)
    mixed = [m for m in mixed_precision_methods() if points is not None and (points["method"] == m).any()]
    if not mixed:
        return None
    pairs = [(method_class(m).report_name, method_class(method_class(m).compared_with).report_name, m) for m in mixed]
    names = " and ".join(f"{mixed_name} against uniform {uniform}" for mixed_name, uniform, _ in pairs)
    text = (f"{names}: mixed-precision budgets (dashed) beside the uniform method (solid) at the same average "
            f"bits, with {BASELINE} as the reference line.\n")
    shown = {m for _, _, m in pairs} | {method_class(m).compared_with for m in mixed}
    figure = _accuracy_vs_bits_plot(points, model_colours(_family_of(con)), methods=shown)
    return Section(f"{pairs[0][0]} against uniform {pairs[0][1]}", text,
                   [(f"pass@1 against average bits: {names}", figure)])


# --------------------------------------------------------------------------- 8. failures


def failures_section(con) -> Section:
    title = "failed cells"
    if not _has_relations(con, "runs"):
        return Section(title, NONE)
    df = con.execute(
        "SELECT model, method, bits, budget, benchmark, error FROM runs WHERE status = 'failed' "
        "ORDER BY model, benchmark, method, bits, budget"
    ).df()
    if df.empty:
        return Section(title, NONE)
    import pandas as pd

    table = pd.DataFrame({
        "model": df["model"], "benchmark": df["benchmark"],
        "setting": [setting_label(*r) for r in zip(df["method"], df["bits"], df["budget"])],
        "error": df["error"].map(_short_error),
    })
    return Section(title, markdown_table(table))


def _short_error(error) -> str:
    """The error on one line, cut to a readable length (the store keeps it whole)."""
    if _missing(error):
        return "(no error recorded)"
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:400] + " ..."


# --------------------------------------------------------------------------- 9. reproducibility


def reproducibility_section(con) -> Section:
    title = "reproducibility: prompts, stop strings and sampler settings of every cell"
    if not _has_relations(con, "runs"):
        return Section(title, NONE)
    df = con.execute("SELECT model, benchmark, method, bits, budget, config_json FROM runs ORDER BY ALL").df()
    if df.empty:
        return Section(title, NONE)
    text = ("Cells with identical prompt, stop strings, sampler, calibration and model settings share a row; "
            "strings are shown JSON-quoted so whitespace is visible.\n\n")
    return Section(title, text + markdown_table(settings_groups(df)))


def environments_section(con) -> Section | None:
    """The software and machines the stored answers were generated with; comparisons across them flagged."""
    if not _has_relations(con, "environments", "runs"):
        return None
    environments = con.execute("""
        SELECT e.environment_id AS id, e.qrobust, e.git_commit AS commit, e.torch, e.transformers, e.gptqmodel,
               e.prefect, e.duckdb, e.device, e.cpu_capability AS cpu_isa, e.threads, e.dtype,
               count(DISTINCT r.cell_id) AS cells
        FROM environments e
        LEFT JOIN runs r ON list_contains(string_split(r.environment_id, ','), e.environment_id)
        GROUP BY ALL HAVING count(DISTINCT r.cell_id) > 0 ORDER BY cells DESC, id""").df()
    if environments.empty:
        return None
    text = ("Every cell's answers were generated in one of these environments (`runs.environment_id`; its "
            "checkpoint's quantization in `runs.quantize_environment_id`). Cells made in different environments "
            "may differ for that reason alone.\n\n" + markdown_table(environments))
    flagged = _comparisons_across_environments(con)
    if flagged is None or flagged.empty:
        text += "\nEvery comparison in this report is between cells generated in the same environment.\n"
    else:
        text += ("\n**Comparisons between cells generated in different environments** (their differences mix the "
                 "method's effect with the machine's or the software's):\n\n" + markdown_table(flagged))
    return Section("environments", text)


def _comparisons_across_environments(con):
    """Each quantized cell whose fp cell (or whose own shards) ran in another environment."""
    if not _has_relations(con, "fp_baselines"):
        return None
    return con.execute("""
        SELECT q.model, q.method, q.bits, q.budget, q.benchmark, q.environment_id AS environment,
               f.environment_id AS fp_environment
        FROM fp_baselines b
        JOIN runs q ON q.cell_id = b.cell_id
        JOIN runs f ON f.cell_id = b.fp_cell_id
        WHERE q.environment_id IS DISTINCT FROM f.environment_id OR contains(q.environment_id, ',')
        ORDER BY ALL""").df()


def settings_groups(runs):
    """One row per model x benchmark x distinct settings, listing the methods that used them."""
    import pandas as pd

    groups: dict[tuple, list[str]] = {}
    for row in runs.itertuples(index=False):
        config = _config(row.config_json)
        cell, fmt = config.get("cell", {}), config.get("format", {})
        key = (
            row.model, row.benchmark,
            json.dumps(fmt.get("prompt_template")),
            json.dumps(fmt.get("stop_strings")),
            _settings_text(cell.get("generation")),
            _settings_text(cell.get("calibration")),
            _settings_text(cell.get("model"), skip=("name", "family", "tiny")),
        )
        groups.setdefault(key, []).append(_method_text(row, cell.get("method")))
    columns = ["model", "benchmark", "prompt template", "stop strings", "sampler", "calibration", "model settings",
               "methods"]
    return pd.DataFrame([[*key, "; ".join(sorted(set(methods)))] for key, methods in groups.items()],
                        columns=columns)


def _config(config_json) -> dict:
    if _missing(config_json):
        return {}
    try:
        return json.loads(config_json)
    except json.JSONDecodeError:
        return {}


def _settings_text(settings, skip=()) -> str:
    if not isinstance(settings, dict):
        return ""
    skip = ("type", *skip)  # a config's type name: the column already says what it is
    return ", ".join(f"{k}={_compact(v)}" for k, v in sorted(settings.items()) if v is not None and k not in skip)


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _method_text(row, method_config) -> str:
    label = setting_label(row.method, row.bits, row.budget)
    if row.method == BASELINE or not isinstance(method_config, dict):
        return label
    return f"{label} ({_settings_text(method_config, skip=('type', 'name', 'bits', 'budget'))})"


# --------------------------------------------------------------------------- assembly

SECTIONS = [
    overview_section,
    pass_at_k_section,
    published_baselines_section,
    accuracy_vs_bits_section,
    degradation_section,
    frontier_section,
    claim_section,
    hawq_allocation_section,
    layer_sensitivity_section,
    hawq_vs_gptq_section,
    failures_section,
    reproducibility_section,
    environments_section,
]


def build_sections(con) -> list[Section]:
    return [section for make in SECTIONS if (section := make(con)) is not None]


def write_report(store_path: Path, out_dir: Path, sections=None) -> dict:
    """Write report.md (figures beside it) and report.html (figures embedded)."""
    from qrobust.tasks.storage.store import connect

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with connect(store_path, read_only=True) as con:
        sections = build_sections(con) if sections is None else sections
    md_parts = ["# qrobust report\n"]
    html_parts = [_table_of_contents(sections)]
    figure_number = 0
    for number, section in enumerate(sections, start=1):
        md_parts.append(f"## {section.title}\n\n{section.markdown}")
        html_parts.append(f'<h2 id="section-{number}">{html.escape(section.title)}</h2>\n'
                          f"{markdown_to_html(section.markdown)}")
        for caption, png in section.figures:
            figure_number += 1
            name = f"figure-{figure_number}.png"
            (out_dir / name).write_bytes(png)
            md_parts.append(f"![{caption}]({name})\n")
            html_parts.append(_html_figure(caption, png))
    (out_dir / "report.md").write_text("\n".join(md_parts))
    (out_dir / "report.html").write_text(_html_page("\n".join(html_parts)))
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html")}


def _table_of_contents(sections) -> str:
    items = "".join(f'<li><a href="#section-{i}">{html.escape(s.title)}</a></li>'
                    for i, s in enumerate(sections, start=1))
    return f"<nav><ol>{items}</ol></nav>"


def _html_figure(caption: str, png: bytes) -> str:
    encoded = base64.b64encode(png).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


# --------------------------------------------------------------------------- markdown -> HTML


def markdown_to_html(markdown: str) -> str:
    """The markdown the sections produce: blank-line separated tables and paragraphs."""
    blocks = [b for b in re.split(r"\n\s*\n", markdown.strip()) if b.strip()]
    return "\n".join(_block_to_html(block.strip()) for block in blocks)


def _block_to_html(block: str) -> str:
    lines = block.splitlines()
    if all(line.startswith("|") for line in lines) and len(lines) >= 2:
        return _table_to_html(lines)
    paragraphs = []
    text_lines, table_lines = [], []
    for line in lines:  # a paragraph line directly followed by a table
        (table_lines if line.startswith("|") else text_lines).append(line)
    if text_lines:
        paragraphs.append(f"<p>{_inline_html(' '.join(text_lines))}</p>")
    if len(table_lines) >= 2:
        paragraphs.append(_table_to_html(table_lines))
    return "\n".join(paragraphs)


def _table_to_html(lines: list[str]) -> str:
    rows = [_split_row(line) for line in lines]
    header, body = rows[0], rows[2:]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body_html = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body_html}\n</tbody></table>"


def _split_row(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _inline_html(text: str) -> str:
    """Escape, then render the few inline marks used: **bold**, _italic_ / *italic*, `code`."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", escaped)
    return re.sub(r"(?<!\w)_(?!\s)(.+?)(?<!\s)_(?!\w)", r"<em>\1</em>", escaped)


def _html_page(body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qrobust report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.82em; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
figcaption {{ color: #555; font-size: 0.85em; }}
nav ol {{ font-size: 0.9em; }}
</style></head>
<body><h1>qrobust report</h1>
{body}
</body></html>
"""
