"""Where and when each stage of a Ray run ran: a timeline per GPU, and the GPUs' utilisation.

    python -m qrobust.tools.ray_timeline WORKSPACE [--since TIMESTAMP] [--png timeline.png]
    python -m qrobust.tools.ray_timeline --sample-gpus utilisation.csv -- qrobust run GRID --runner ray

The first form reads `stage_events` (`started_at`, `seconds`, `placement`) of a workspace and
prints, for every GPU (and for stages that held none), which stages ran when, plus each GPU's
busy fraction over the run; `--png` draws it. The second runs a command while sampling every
GPU's utilisation with `nvidia-smi` twice a second into a CSV, and prints each GPU's mean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def stage_spans(store_path: Path, since: str | None = None) -> list[dict]:
    """One span per stage run a Ray worker computed: stage, subject, GPU ids, start and end (seconds
    since the first span began)."""
    from qrobust.tasks.storage.store import query

    where = "placement IS NOT NULL AND started_at IS NOT NULL AND state = 'Completed'"
    if since:
        where += f" AND started_at >= TIMESTAMP '{since}'"
    rows = query(store_path, f"SELECT cell_id, stage, shard, started_at, seconds, placement FROM stage_events "
                             f"WHERE {where} ORDER BY started_at")
    if rows.empty:
        return []
    origin = rows["started_at"].min()
    spans = []
    for row in rows.itertuples(index=False):
        placement = json.loads(row.placement)
        start = (row.started_at - origin).total_seconds()
        spans.append({"stage": row.stage, "subject": row.cell_id, "shard": row.shard,
                      "gpus": tuple(placement.get("gpu_ids") or ()) or ("cpu",), "node": placement.get("node"),
                      "start": start, "end": start + row.seconds})
    return spans


def busy_fractions(spans: list[dict]) -> dict[str, float]:
    """Each GPU's fraction of the run's wall time with at least one stage on it."""
    if not spans:
        return {}
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    lanes: dict[str, list[tuple[float, float]]] = {}
    for span in spans:
        for gpu in span["gpus"]:
            lanes.setdefault(gpu, []).append((span["start"], span["end"]))
    fractions = {}
    for gpu, intervals in lanes.items():
        covered, reach = 0.0, float("-inf")
        for start, end in sorted(intervals):
            if end > reach:
                covered += end - max(start, reach)
                reach = end
        fractions[gpu] = covered / wall if wall > 0 else 0.0
    return fractions


def draw(spans: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = sorted({gpu for span in spans for gpu in span["gpus"]})
    colours = {stage: plt.cm.tab10(i) for i, stage in enumerate(sorted({s["stage"] for s in spans}))}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(lanes)))
    for span in spans:
        for gpu in span["gpus"]:
            ax.barh(lanes.index(gpu), span["end"] - span["start"], left=span["start"], color=colours[span["stage"]],
                    edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(len(lanes)), [f"GPU {g}" if g != "cpu" else "no GPU" for g in lanes])
    ax.set_xlabel("seconds since the first stage began")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), loc="upper right", fontsize=7, ncol=len(colours))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def sample_gpus(out: Path, command: list[str], every_s: float = 0.5) -> int:
    """Run `command` while writing every GPU's utilisation to `out`; returns its exit code."""
    with open(out, "w") as csv:
        csv.write("seconds,gpu,utilisation_percent,memory_used_mib\n")
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"-lms={int(every_s * 1000)}"], stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        run = subprocess.Popen(command)
        try:
            while run.poll() is None:
                line = sampler.stdout.readline()
                if line.strip():
                    gpu, utilisation, memory = (part.strip() for part in line.split(","))
                    csv.write(f"{time.monotonic() - started:.2f},{gpu},{utilisation},{memory}\n")
        finally:
            sampler.terminate()
    return run.returncode


def _mean_utilisation(csv_path: Path) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for line in csv_path.read_text().splitlines()[1:]:
        _, gpu, utilisation, _ = line.split(",")
        totals.setdefault(gpu, []).append(float(utilisation))
    return {gpu: sum(values) / len(values) for gpu, values in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qrobust.tools.ray_timeline", description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", default=None)
    parser.add_argument("--since", default=None, help="only stages that began at or after this timestamp")
    parser.add_argument("--png", default=None, help="draw the timeline to this file")
    parser.add_argument("--sample-gpus", default=None, metavar="CSV",
                        help="run the command after -- while sampling GPU utilisation into CSV")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.sample_gpus:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        code = sample_gpus(Path(args.sample_gpus), command)
        for gpu, mean in sorted(_mean_utilisation(Path(args.sample_gpus)).items()):
            print(f"GPU {gpu}: mean utilisation {mean:.0f}%")
        return code
    if not args.workspace:
        parser.error("give a workspace, or --sample-gpus CSV -- COMMAND")
    spans = stage_spans(Path(args.workspace) / "results.duckdb", args.since)
    if not spans:
        print("no stage ran on a Ray worker in this workspace")
        return 1
    for span in spans:
        shard = "" if span["shard"] is None or span["shard"] != span["shard"] else f"#{int(span['shard'])}"
        print(f"{span['start']:8.1f}s -> {span['end']:8.1f}s  GPU {','.join(span['gpus']):>5}  "
              f"{span['stage']:<13} {span['subject'][:24]}{shard}")
    for gpu, fraction in sorted(busy_fractions(spans).items()):
        print(f"GPU {gpu}: busy {fraction:.0%} of the run")
    if args.png:
        draw(spans, Path(args.png))
        print(f"timeline: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
