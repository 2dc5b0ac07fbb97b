"""What each verdict means, on every backend."""

from __future__ import annotations

from qrobust.sandbox import Program, run_programs


def judge(backend: str, source: str, timeout_s: float = 10.0):
    [verdict] = run_programs([Program("p", source, timeout_s)], backend=backend)
    return verdict


def test_a_program_that_runs_to_its_end_passes(any_backend):
    verdict = judge(any_backend, "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n")
    assert (verdict.status, verdict.error) == ("passed", "")


def test_a_failed_assertion_is_failed_with_its_message(any_backend):
    verdict = judge(any_backend, "assert 1 + 1 == 3, 'arithmetic is broken'\n")
    assert (verdict.status, verdict.error) == ("failed", "AssertionError: arithmetic is broken")


def test_an_uncaught_exception_is_failed(any_backend):
    verdict = judge(any_backend, "{}['missing']\n")
    assert (verdict.status, verdict.error) == ("failed", "KeyError: 'missing'")


def test_a_program_that_does_not_compile_is_an_error(any_backend):
    verdict = judge(any_backend, "def broken(:\n    pass\n")
    assert verdict.status == "error"
    assert verdict.error.startswith("SyntaxError")


def test_exceeding_the_time_limit_is_a_timeout_measured_per_program(any_backend):
    verdict = judge(any_backend, "import time\ntime.sleep(30)\n", timeout_s=0.5)
    assert verdict.status == "timeout"
    assert 0.5 <= verdict.seconds < 2.0


def test_exiting_with_status_zero_before_the_end_is_failed(any_backend):
    verdict = judge(any_backend, "import os\nos._exit(0)\nassert False\n")
    assert verdict.status == "failed"
    assert "before its last statement" in verdict.error


def test_a_crash_is_failed_with_the_signal(any_backend):
    verdict = judge(any_backend, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert verdict.status == "failed"
    assert verdict.error.startswith("killed by SIGSEGV")


def test_output_does_not_change_the_verdict(any_backend):
    verdict = judge(
        any_backend, "import sys\nfor i in range(10000):\n    print('PASS', i)\n    print('FAIL', i, file=sys.stderr)\n"
    )
    assert verdict.status == "passed"


def test_programs_run_as_main_with_the_standard_library_only(any_backend):
    source = """
assert __name__ == "__main__"
import decimal, json, unittest
try:
    import pytest
except ImportError:
    pass
else:
    raise AssertionError("a third-party package is importable")
"""
    assert judge(any_backend, source).status == "passed"


def test_each_program_has_its_own_writable_scratch_directory_and_a_clean_environment(any_backend):
    source = """
import os
with open("notes.txt", "w") as f:
    f.write("scratch")
assert os.listdir(".") == ["notes.txt"], os.listdir(".")
assert os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"]
assert set(os.environ) == {"PATH", "LANG", "OMP_NUM_THREADS", "HOME", "TMPDIR"}, sorted(os.environ)
"""
    verdicts = run_programs([Program("first", source), Program("second", source)], backend=any_backend)
    assert [verdict.status for verdict in verdicts] == ["passed", "passed"], verdicts


def test_stdin_is_empty(any_backend):
    assert judge(any_backend, "import sys\nassert sys.stdin.read() == ''\n").status == "passed"


def test_non_ascii_source_round_trips(any_backend):
    assert judge(any_backend, "s = 'naïve – 東京 🚀'\nassert len(s) == 12, len(s)\n").status == "passed"
