"""Report stage: reads the store and writes report.md and a self-contained report.html.

Sections are functions of a read-only DuckDB connection that return markdown and figures,
so adding a section is one function and one line in `SECTIONS`.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    title: str
    markdown: str
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, png bytes)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def markdown_table(df) -> str:
    if df.empty:
        return "_no rows_\n"
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def _cell_text(value) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def pass_at_1_section(con) -> Section:
    df = con.execute(
        """
        SELECT model, family, benchmark, method, bits, budget, round(avg_bits, 2) AS avg_bits, n_problems,
               round(pass_at_1, 3) AS pass_at_1, model_bytes, peak_mem_bytes, round(gen_tokens_per_s, 1) AS tok_per_s
        FROM results ORDER BY model, benchmark, method, avg_bits DESC
        """
    ).df()
    return Section("pass@1 per cell", markdown_table(df), [("pass@1 against bits", _pass_vs_bits_plot(con))])


def _pass_vs_bits_plot(con) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = con.execute("SELECT model, method, benchmark, avg_bits, pass_at_1 FROM results").df()
    benchmarks = sorted(df["benchmark"].unique()) or ["-"]
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5.5 * len(benchmarks), 4), squeeze=False)
    for ax, benchmark in zip(axes[0], benchmarks):
        part = df[df["benchmark"] == benchmark]
        for (model, method), group in part.groupby(["model", "method"]):
            group = group.sort_values("avg_bits")
            style = "o--" if method == "fp" else "o-"
            ax.plot(group["avg_bits"], group["pass_at_1"], style, label=f"{model} {method}")
        ax.set_title(benchmark)
        ax.set_xlabel("average bits per quantized weight")
        ax.set_ylabel("pass@1")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def failures_section(con) -> Section:
    df = con.execute(
        "SELECT model, method, bits, budget, benchmark, error FROM runs WHERE status = 'failed' ORDER BY model"
    ).df()
    return Section("failed cells", markdown_table(df) if not df.empty else "_none_\n")


def reproducibility_section(con) -> Section:
    df = con.execute(
        """
        SELECT model, method, bits, budget, benchmark,
               json_extract_string(config_json, '$.format.prompt_template') AS prompt_template,
               json_extract_string(config_json, '$.format.stop_strings') AS stop_strings,
               json_extract_string(config_json, '$.cell.generation') AS sampler
        FROM runs ORDER BY model, benchmark, method
        """
    ).df()
    return Section("reproducibility: prompts, stop strings and sampler settings of every cell", markdown_table(df))


SECTIONS = [pass_at_1_section, failures_section, reproducibility_section]


def build_sections(con) -> list[Section]:
    return [make(con) for make in SECTIONS]


def write_report(store_path: Path, out_dir: Path, sections=None) -> dict:
    """Write report.md (figures beside it) and report.html (figures embedded)."""
    from tasks.store import connect

    out_dir.mkdir(parents=True, exist_ok=True)
    with connect(store_path, read_only=True) as con:
        sections = build_sections(con) if sections is None else sections
    md_parts, html_parts = ["# qrobust report\n"], []
    figure_number = 0
    for section in sections:
        md_parts.append(f"## {section.title}\n\n{section.markdown}")
        html_parts.append(f"<h2>{html.escape(section.title)}</h2>\n{_markdown_to_html(section.markdown)}")
        for caption, png in section.figures:
            figure_number += 1
            name = f"figure-{figure_number}.png"
            (out_dir / name).write_bytes(png)
            md_parts.append(f"![{caption}]({name})\n")
            encoded = base64.b64encode(png).decode()
            html_parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    (out_dir / "report.md").write_text("\n".join(md_parts))
    (out_dir / "report.html").write_text(_html_page("\n".join(html_parts)))
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html")}


def _markdown_to_html(markdown: str) -> str:
    """Tables and paragraphs: the only markdown the sections produce."""
    lines = [line for line in markdown.strip().splitlines()]
    if lines and lines[0].startswith("|"):
        rows = [line.strip("|").split(" | ") for line in lines if line.startswith("|")]
        header, body = rows[0], rows[2:]
        head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in header)
        rows_html = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in body
        )
        rest = "\n".join(line for line in lines if not line.startswith("|"))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>" + (
            f"<p>{html.escape(rest)}</p>" if rest else ""
        )
    return "".join(f"<p>{html.escape(p)}</p>" for p in markdown.strip().split("\n\n"))


def _html_page(body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qrobust report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.85em; }}
</style></head>
<body><h1>qrobust report</h1>
{body}
</body></html>
"""
