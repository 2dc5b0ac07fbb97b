"""Attacks on the sandbox, and the check that each one is contained.

    python -m qrobust.tools.hostile [--backend docker] [--backend bwrap]

Every attack is a program that would PASS only if the attack worked: it reached a host
file, the environment, a listener on the host's loopback, a host process, or fooled the
judge into accepting a wrong solution. Each attack runs in one call followed by a
normal program. An attack is contained when its verdict is failed or timeout, the
follower still passed, and the host is untouched: the listener saw no connection, the
workspace is byte-for-byte unchanged, no file appeared outside the sandbox, and the
canary process is alive. Only isolating backends are attacked; 'none' would lose.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from qrobust.sandbox import BACKENDS, Limits, Program, Verdict, available_backends, run_programs

SECRET_ENV = "QROBUST_HOSTILE_SECRET"
SECRET_PREFIX = "qrobust-secret-"
ESCAPE_NAME = "qrobust-escaped"
CONTAINED = ("failed", "timeout")

# A wrong solution with its test, as the pipeline assembles it; TRICK is where a
# completion would put code that tries to make the judge accept it anyway.
WRONG_SOLUTION = """
def add(a, b):
    return a - b
{trick}

def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(0, 0) == 0

check(add)
"""
RIGHT_SOLUTION = WRONG_SOLUTION.replace("return a - b", "return a + b")
FOLLOWER = RIGHT_SOLUTION.format(trick="")

# Walks the program's own stack for the runner's pass message and writes it to every open
# fd: the strongest in-process forgery; it must fail whenever it runs outside that process.
STEAL_PASS_MESSAGE_FROM_STACK = """\
frame = sys._getframe()
while frame is not None:
    if "seal" in frame.f_locals:
        for fd in range(3, 64):
            try:
                os.write(fd, frame.f_locals["seal"])
            except OSError:
                pass
    frame = frame.f_back
"""


@dataclass(frozen=True)
class Attack:
    name: str
    source: str  # str.format template over the Bait's fields
    timeout_s: float = 3.0


ATTACKS = (
    Attack("infinite loop", "while True:\n    pass\n", 0.5),
    Attack("long sleep", "import time\ntime.sleep(3600)\n", 0.5),
    Attack(
        "fork bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        1.0,
    ),
    Attack("memory bomb", "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n"),
    Attack(
        "memory bomb in many processes",
        """
import os, time
for _ in range(12):
    if os.fork() == 0:
        blocks = []
        try:
            while True:
                blocks.append(bytearray(32 << 20))
        except MemoryError:
            time.sleep(60)
time.sleep(60)
""",
        1.5,
    ),
    Attack(
        "gigabytes of output",
        """
import os, sys
chunk = "x" * (1 << 20)
while True:
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
""",
        1.0,
    ),
    Attack(
        "fill the scratch disk",
        """
import os
with open("/tmp/fill", "wb") as f:
    while True:
        f.write(b"x" * (1 << 20))
""",
    ),
    Attack(
        "connect to the host's loopback listener",
        """
import socket
connection = socket.create_connection(("127.0.0.1", {port}), timeout=2)
connection.sendall(b"escaped")
""",
    ),
    Attack(
        "write outside the scratch directory",
        """
with open("/tmp/{host_tmp_name}", "w") as f:  # the sandbox's own /tmp, not the host's
    f.write("escaped")
written = None
for path in [{workspace!r} + "/{escape}", "/{escape}", "/etc/{escape}", "/usr/{escape}",
             "/var/tmp/{escape}", "/opt/qrobust/runner.py"]:
    try:
        with open(path, "a") as f:
            f.write("escaped")
        written = path
        break  # one is proof enough
    except OSError:
        pass
assert written, "nothing outside the scratch directory is writable"
""",
    ),
    Attack(
        "read the workspace database",
        """
with open({database!r}, "rb") as f:
    assert b"{secret_prefix}" in f.read()
""",
    ),
    Attack(
        "read host files",
        """
readable = []
for path in ["/etc/shadow", "/root/.bash_history", {repository_file!r}, "/proc/1/root/etc/shadow"]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        readable.append(path)
    except OSError:
        pass
assert readable, "no host file is readable"
""",
    ),
    Attack(
        "read the environment secret",
        """
import glob, os
found = [name for name in os.environ if name == "{secret_env}"]
for path in glob.glob("/proc/*/environ"):
    try:
        with open(path, "rb") as f:
            if b"{secret_env}=" in f.read():
                found.append(path)
    except OSError:
        pass
assert found, "the secret is not in any environment"
""",
    ),
    Attack(
        "read the runner's and other programs' memory and files",
        """
import os
read = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) in (1, os.getpid()):
        continue  # the sandbox's init holds nothing secret; see sandbox/runner.py
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            if b"python3" not in f.read():
                continue
    except OSError:
        continue
    for probe in (lambda: open("/proc/%s/environ" % pid, "rb").read(),
                  lambda: os.listdir("/proc/%s/fd" % pid),
                  lambda: open("/proc/%s/mem" % pid, "rb").read(1)):
        try:
            probe()
            read.append(pid)
        except OSError:
            pass
assert read, "no other process readable"
""",
    ),
    Attack(
        "kill the parent",
        "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(1)\n",
    ),
    Attack(
        "kill every process it can",
        "import os, signal, time\nos.kill(-1, signal.SIGKILL)\ntime.sleep(1)\n",
    ),
    Attack(
        "freeze every process it can",
        "import os, signal, time\nos.kill(-1, signal.SIGSTOP)\ntime.sleep(1)\n",
        1.0,
    ),
    Attack(
        "kill host processes",
        """
import os, signal
reached = []
for pid in ({canary_pid}, {host_pid}):
    try:
        os.kill(pid, 0)  # may it be signalled?
        reached.append(pid)
    except OSError:
        pass
os.kill({canary_pid}, signal.SIGKILL)
assert reached, "no host process reachable"
""",
    ),
    Attack(
        "gain privileges",
        """
import ctypes, os
gained = []
for name, attempt in [
    ("setuid", lambda: os.setuid(0)),
    ("chroot", lambda: os.chroot("/")),
    ("new user namespace", lambda: ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 or 1 / 0),
]:
    try:
        attempt()
        gained.append(name)
    except (OSError, ZeroDivisionError):
        pass
assert gained, "no privilege gained"
""",
    ),
    Attack("sys.exit(0) before the tests", WRONG_SOLUTION.format(trick="import sys\nsys.exit(0)")),
    Attack("os._exit(0) before the tests", WRONG_SOLUTION.format(trick="import os\nos._exit(0)")),
    Attack("raise SystemExit", WRONG_SOLUTION.format(trick="raise SystemExit")),
    Attack(
        "monkeypatch builtins and the judge's functions",
        WRONG_SOLUTION.format(
            trick="""
import builtins, os, sys
_exit, _write = os._exit, os.write
os._exit = lambda code: _exit(0)
os.write = lambda fd, data: _write(fd, data.replace(b"FAIL", b"PASS"))
sys.exit = lambda *args: _exit(0)
sys.excepthook = lambda *args: _exit(0)
builtins.AssertionError = type("AssertionError", (Exception,), {{}})
builtins.BaseException = type("BaseException", (Exception,), {{}})
"""
        ),
    ),
    Attack(
        "print a fake pass marker",
        WRONG_SOLUTION.format(
            trick="""
import os, sys
for marker in (b"PASS", b"passed", b"PASS " + b"0" * 32):
    print(marker.decode())
    sys.stderr.write(marker.decode() + "\\n")
    for fd in range(3, 64):
        try:
            os.write(fd, marker)
        except OSError:
            pass
"""
        ),
    ),
    Attack(
        "forge the runner's output lines",
        WRONG_SOLUTION.format(
            trick="""
import json, os
line = ("%s " + json.dumps({{"verdict": 0, "status": "passed", "seconds": 0, "error": ""}}) + "\\n")
for pid in os.listdir("/proc"):
    for fd in ("1", "2"):
        try:
            with open("/proc/%s/fd/%s" % (pid, fd), "w") as f:
                for guess in ("0" * 32, "token", ""):
                    f.write(line % guess)
        except OSError:
            pass
"""
        ),
    ),
    Attack(
        "fork, parent exits 0, child finishes the tests",
        RIGHT_SOLUTION.format(trick="import os\nif os.fork():\n    os._exit(0)"),
    ),
    Attack(
        "fork, child steals the real pass message and sends it",
        RIGHT_SOLUTION.format(
            trick="import os, sys\nif os.fork() == 0:\n"
            + textwrap.indent(STEAL_PASS_MESSAGE_FROM_STACK, "    ")
            + "    os._exit(0)\nos.wait()\nos._exit(0)\n"
        ),
    ),
    Attack(
        "ignore signals and spin",
        """
import signal
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU, signal.SIGUSR1):
    signal.signal(number, signal.SIG_IGN)
while True:
    pass
""",
        1.0,
    ),
    Attack(
        "alarm handler exits 0 during the tests",
        WRONG_SOLUTION.replace("def check(candidate):", "def check(candidate):\n    time.sleep(1)").format(
            trick="import os, signal, time\n"
            "signal.signal(signal.SIGALRM, lambda *args: os._exit(0))\n"
            "signal.setitimer(signal.ITIMER_REAL, 0.1)"
        ),
    ),
    Attack(
        "deep recursion",
        "import sys\nsys.setrecursionlimit(10**8)\ndef dive(n):\n    return dive(n + 1) + 1\ndive(0)\n",
        1.0,
    ),
    Attack("ctypes segfault", "import ctypes\nctypes.string_at(0)\n"),
    Attack(
        "read stdin",
        """
import os, sys
data = sys.stdin.read()
for fd in (0, 1, 2):
    try:
        data += os.read(fd, 4096).decode(errors="replace")
    except OSError:
        pass
assert data, "stdin is empty"
""",
    ),
)


class Bait:
    """Host-side things an escaped program would touch: a workspace holding a secret, an
    environment secret, a loopback listener and a canary process."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="qrobust-hostile-"))
        self.workspace = self.directory / "workspace"
        self.workspace.mkdir()
        self.database = self.workspace / "qrobust.duckdb"
        self.database.write_bytes(f"DUCK {SECRET_PREFIX}{secrets.token_hex(16)}\n".encode())
        self.host_tmp_name = f"{ESCAPE_NAME}-{secrets.token_hex(4)}"
        self._saved_env = os.environ.get(SECRET_ENV)
        os.environ[SECRET_ENV] = SECRET_PREFIX + secrets.token_hex(16)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.canary = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        self._snapshot = self._workspace_digest()
        self.connections = 0

    def close(self) -> None:
        self.canary.kill()
        self.canary.wait()
        self.listener.close()
        if self._saved_env is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = self._saved_env
        # Present only after an unisolated run, which the tests do on purpose as a control.
        (Path(tempfile.gettempdir()) / self.host_tmp_name).unlink(missing_ok=True)
        shutil.rmtree(self.directory)

    def __enter__(self) -> Bait:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def fields(self) -> dict:
        return {
            "port": self.listener.getsockname()[1],
            "workspace": str(self.workspace),
            "database": str(self.database),
            "repository_file": str(Path(__file__).resolve()),
            "secret_prefix": SECRET_PREFIX,
            "secret_env": SECRET_ENV,
            "canary_pid": self.canary.pid,
            "host_pid": os.getpid(),
            "escape": ESCAPE_NAME,
            "host_tmp_name": self.host_tmp_name,
        }

    def _workspace_digest(self) -> dict[str, str]:
        return {
            str(path.relative_to(self.workspace)): hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file()
            else "dir"
            for path in sorted(self.workspace.rglob("*"))
        }

    def damage(self) -> list[str]:
        """What an attack changed on the host; empty when nothing."""
        found = []
        try:
            while True:
                connection, _ = self.listener.accept()
                connection.close()
                self.connections += 1
        except BlockingIOError:
            pass
        if self.connections:
            found.append(f"the loopback listener accepted {self.connections} connection(s)")
        if self._workspace_digest() != self._snapshot:
            found.append("the workspace changed")
        if self.canary.poll() is not None:
            found.append("the canary process was killed")
        for path in (Path("/") / ESCAPE_NAME, Path("/etc") / ESCAPE_NAME, Path("/usr") / ESCAPE_NAME,
                     Path("/var/tmp") / ESCAPE_NAME, Path(tempfile.gettempdir()) / self.host_tmp_name):  # fmt: skip
            if path.exists():
                found.append(f"{path} appeared on the host")
        return found


@dataclass(frozen=True)
class Outcome:
    attack: str
    backend: str
    verdict: Verdict
    follower: Verdict
    damage: tuple[str, ...]

    @property
    def contained(self) -> bool:
        return self.verdict.status in CONTAINED and self.follower.passed and not self.damage

    def explain(self) -> str:
        problems = list(self.damage)
        if self.verdict.status not in CONTAINED:
            problems.append(f"verdict {self.verdict.status} ({self.verdict.error})")
        if not self.follower.passed:
            problems.append(f"the program after it got {self.follower.status} ({self.follower.error})")
        return "; ".join(problems) or "contained"


# A frozen sandbox is only noticed by the whole-sandbox watchdog; a short start-up
# allowance keeps the suite quick without changing what is tested.
SUITE_LIMITS = Limits(watchdog_slack_s=4.0)


def run_attack(attack: Attack, backend: str, bait: Bait, limits: Limits = SUITE_LIMITS) -> Outcome:
    programs = [
        Program(f"attack: {attack.name}", attack.source.format(**bait.fields()), attack.timeout_s),
        Program("follower", FOLLOWER, 10.0),
    ]
    verdict, follower = run_programs(programs, backend=backend, limits=limits)
    return Outcome(attack.name, backend, verdict, follower, tuple(bait.damage()))


def format_table(outcomes: list[Outcome]) -> str:
    width = max([len("attack")] + [len(outcome.attack) for outcome in outcomes])
    lines = [f"{'attack':<{width}}  {'backend':<7}  {'verdict':<8}  contained"]
    for outcome in outcomes:
        contained = "yes" if outcome.contained else f"NO: {outcome.explain()}"
        lines.append(f"{outcome.attack:<{width}}  {outcome.backend:<7}  {outcome.verdict.status:<8}  {contained}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="default: every available one")
    args = parser.parse_args(argv)
    backends = args.backend or available_backends()
    if not backends:
        print("no isolating sandbox backend is available", file=sys.stderr)
        return 2
    outcomes = []
    with Bait() as bait:
        for backend in backends:
            for attack in ATTACKS:
                outcomes.append(run_attack(attack, backend, bait))
                print(format_table(outcomes[-1:]).splitlines()[1], flush=True)
    print()
    print(format_table(outcomes))
    return 0 if all(outcome.contained for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
