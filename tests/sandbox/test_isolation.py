"""Facts about the inside of each isolating sandbox, checked by a program running there."""

from __future__ import annotations

from qrobust.sandbox import Limits, Program, run_programs

INSIDE = """
import os, resource

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]

assert os.getuid() == 65534 and os.getgid() == 65534, (os.getuid(), os.getgid())
assert int(status("CapEff"), 16) == 0, status("CapEff")
assert status("NoNewPrivs") == "1"
interfaces = [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]]
assert interfaces == ["lo"], interfaces
for path in ("/", "/usr", "/etc"):
    try:
        open(os.path.join(path, "qrobust-probe"), "w")
    except OSError:
        pass
    else:
        raise AssertionError(path + " is writable")
for path in ("/home", "/root", "/work", "/var/lib/qrobust-docker"):
    try:
        assert not os.listdir(path), path + " is visible"
    except (FileNotFoundError, PermissionError):
        pass
pids = [name for name in os.listdir("/proc") if name.isdigit()]
assert len(pids) < 16, pids
scratch = os.statvfs("/tmp")
assert scratch.f_blocks * scratch.f_frsize <= {scratch_mb} << 20, scratch
assert resource.getrlimit(resource.RLIMIT_AS) == ({memory_mb} << 20,) * 2
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
assert resource.getrlimit(resource.RLIMIT_FSIZE) == ({scratch_mb} << 20,) * 2
"""


def test_programs_run_unprivileged_offline_read_only_and_limited(isolating_backend):
    limits = Limits(memory_mb=512, scratch_mb=32)
    source = INSIDE.format(memory_mb=limits.memory_mb, scratch_mb=limits.scratch_mb)
    [verdict] = run_programs([Program("inside", source)], backend=isolating_backend, limits=limits)
    assert verdict.status == "passed", verdict.error


ESCAPE_THE_SESSION = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("/tmp/escapee", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
    os._exit(0)
time.sleep(0.5)
"""
ESCAPEE_IS_GONE = """
import os
pid = open("/tmp/escapee").read()
state = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[0] if os.path.exists("/proc/" + pid) else "gone"
assert state in ("gone", "Z"), state
"""


def test_a_process_that_escapes_its_programs_session_is_killed(isolating_backend):
    programs = [Program("escape", ESCAPE_THE_SESSION), Program("check", ESCAPEE_IS_GONE)]
    verdicts = run_programs(programs, backend=isolating_backend, limits=Limits(parallel=1))
    assert [verdict.status for verdict in verdicts] == ["passed", "passed"], verdicts
