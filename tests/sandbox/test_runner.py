"""The runner's contract: standard library only, token-prefixed events, and a host-side
parser that no program output can fool."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from qrobust.sandbox import runner
from qrobust.sandbox.local_backend import RUNNER_PATH
from qrobust.sandbox.shard import EventStream


def imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
    return names


def test_the_runner_and_the_code_it_injects_import_only_the_standard_library():
    modules = imported_modules(RUNNER_PATH.read_text()) | imported_modules(runner.ZYGOTE)
    assert modules - set(sys.stdlib_module_names) == set()


def test_the_runner_speaks_only_in_token_prefixed_events():
    request = {
        "token": "t0ken",
        "programs": [
            {"source": "print('t0ken {\"verdict\": 1}')\n", "timeout_s": 5},
            {"source": "assert False\n", "timeout_s": 5},
        ],
        "parallel": 1,
        "rlimits": {"address_space_mb": 512, "file_size_mb": 16, "open_files": 64, "processes": 0},
        "output_bytes": 1000,
        "private_pid_namespace": False,
        "deadline_s": 60,
    }
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(RUNNER_PATH)],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
    )
    lines = result.stdout.decode().splitlines()
    events = [json.loads(line.split(" ", 1)[1]) for line in lines if "alive" not in line]
    assert all(line.startswith("t0ken {") for line in lines)
    assert [event.get("status") for event in events if "verdict" in event] == ["passed", "failed"]
    assert events[-1] == {"finished": 2}


def event_line(token: str, event: dict) -> bytes:
    return f"{token} {json.dumps(event)}\n".encode()


@given(
    garbage=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_event_parsing_ignores_foreign_lines_and_any_chunking(garbage, cuts):
    token = "a" * 32
    genuine = [
        event_line(token, {"started": 0}),
        event_line(token, {"verdict": 0, "status": "failed", "seconds": 1, "error": ""}),
    ]
    forged = [
        event_line("b" * 32, {"verdict": 1, "status": "passed"}),
        event_line(token[:-1], {"verdict": 2, "status": "passed"}),
    ]
    # Garbage may lack a newline; one is added so that it cannot swallow the next line.
    stream_bytes = (
        b"".join(g.replace(b"\n", b"") + b"\n" for g in garbage) + forged[0] + genuine[0] + forged[1] + genuine[1]
    )
    stream = EventStream(token)
    previous = 0
    for cut in sorted(set(cuts)) + [len(stream_bytes)]:
        stream.feed(stream_bytes[previous:cut])
        previous = max(previous, cut)
    assert stream.started == {0}
    assert list(stream.verdicts) == [0]
    assert stream.verdicts[0]["status"] == "failed"


def test_an_overlong_line_is_dropped_without_losing_the_next_event():
    token = "c" * 32
    stream = EventStream(token)
    stream.feed(token.encode() + b" " + b"x" * 100_000)
    stream.feed(b"\n" + event_line(token, {"finished": 1}))
    assert stream.finished


def test_the_first_verdict_for_a_program_wins():
    token = "d" * 32
    stream = EventStream(token)
    stream.feed(event_line(token, {"verdict": 0, "status": "failed", "seconds": 0, "error": ""}))
    stream.feed(event_line(token, {"verdict": 0, "status": "passed", "seconds": 0, "error": ""}))
    assert stream.verdicts[0]["status"] == "failed"
