"""Judge untrusted Python programs, each in its own subprocess. Standard library only.

This file runs inside the sandbox: the container image holds a copy, the bubblewrap
backend mounts one, and the unisolated backend 'none' runs it as a plain subprocess. It
must import nothing but the standard library and must not know the pipeline.

Protocol
    stdin, or the file named by argv[1]: one JSON request
        {"token": str, "programs": [{"source": str, "timeout_s": float}, ...],
         "parallel": int, "rlimits": {...}, "output_bytes": int,
         "private_pid_namespace": bool, "deadline_s": float}
    stdout: one line per event, "<token> <json>", each written with a single write:
        {"started": i}                                   program i was spawned
        {"verdict": i, "status": s, "seconds": t, "error": e}
        {"finished": n}                                  all n programs were judged
    The token lets the host ignore anything a program manages to write into this
    process's stdout (for example through /proc/1/fd/1 of the container's init).

Verdicts
    passed   the program ran to its last statement, in the process that was started
    failed   it raised, exited early, was killed by a signal, or broke the rules
    timeout  it exceeded its wall-clock limit (or its CPU-time backstop)
    error    the harness could not judge it: it does not compile, or could not be started

How "passed" is established, and the threat model
    Each program runs as `python3 -I -S -c PROLOGUE`: a trusted prologue that reads a
    payload (a fresh random nonce and the program source) from a memfd, closes it, sets
    resource limits, and exec()s the program in a fresh __main__ module. Only when exec()
    returns normally, in the same process that was started (os.getpid() unchanged), does
    the prologue send "PASS <nonce>" over a private AF_UNIX SOCK_SEQPACKET socket and
    _exit(0). The runner accepts a pass only if
      - the message equals "PASS <nonce>" for this program's nonce,
      - the kernel-attested sender (SCM_CREDENTIALS) is the started process itself,
        so a forked child can never report, even if it learned the nonce,
      - and that process then exited with status 0.
    Exit status 0 alone proves nothing. This defeats sys.exit(0) / raise SystemExit
    before or inside the tests (exec raises), os._exit(0) (no message), printing a fake
    marker (stdout is discarded; the socket is separate), writing a guessed marker to the
    socket (wrong nonce), monkeypatching os.write / os._exit / sys / builtins (the
    prologue captured private references to the functions it needs before the program
    ran; exception names in `except` clauses are bound locally too), and
    fork-and-let-the-child-finish (pid check and kernel credentials).

    What an in-process attacker can still do: code that deliberately introspects the
    interpreter (walks frames with sys._getframe, searches gc.get_objects, reads
    /proc/self/mem) can find the nonce and the socket in its own process and forge a
    pass for ITSELF. No in-process scheme can prevent that: the prologue and the program
    share one address space. It cannot forge a pass for any other program (each has its
    own socket and nonce, sockets cannot be reopened through /proc, and the runner
    marks itself non-dumpable so its fds and memory are not readable by programs), and
    it gains nothing outside the sandbox. Verdict integrity is aimed at model-generated
    code, which cheats by accident (exit early, swallow failures), not at code written
    to attack this harness; host isolation does not depend on it at all.

Containment inside the sandbox (the sandbox itself is the real boundary)
    Every program gets its own session (setsid), scratch directory, clean environment,
    /dev/null as stdin, discarded stdout, a capped stderr tail, and rlimits: address
    space, processes, file size, open files, CPU-time backstop, no core files. After it
    ends, everything left in its session is killed; inside a private PID namespace, any
    process that escaped into a session of its own is killed too. A program that kills
    this runner (all programs share one uid) ends the shard early; the host sees which
    programs had started and re-runs the rest, so one program cannot take others down.
"""

import concurrent.futures
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# Runs in the program's own interpreter before the program. Everything it needs after the
# program has run is bound to a local first, since the program may rebind any global.
PROLOGUE = r"""
import os, sys
def _judge(payload_fd, report_fd):
    write, getpid, exit_now = os.write, os.getpid, os._exit
    settrace, setprofile = sys.settrace, sys.setprofile
    any_exception, type_of, text_of, module_type = BaseException, type, str, type(sys)
    pid = getpid()

    def report(kind, exc):
        try:
            text = type_of(exc).__name__
            detail = text_of(exc)
            if detail:
                text += ": " + detail
        except any_exception:
            text = "an exception that cannot be printed"
        try:
            write(report_fd, (kind + " " + text[:400]).encode("utf-8", "replace"))
        except any_exception:
            pass

    try:
        chunks = []
        while True:
            chunk = os.read(payload_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(payload_fd)
        nonce, limits, source = b"".join(chunks).split(b"\n", 2)
        del chunks
        seal = b"PASS " + nonce
        os.set_inheritable(report_fd, False)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # under memory pressure, kill a program, not the runner
        except OSError:
            pass
        import resource
        for item in limits.decode().split():
            name, _, values = item.partition("=")
            kind, wanted = getattr(resource, name), [int(v) for v in values.split(",")]
            hard = resource.getrlimit(kind)[1]
            if hard != resource.RLIM_INFINITY:
                wanted = [min(v, hard) for v in wanted]
            resource.setrlimit(kind, tuple(wanted))
        code = compile(source.decode("utf-8", "surrogatepass"), "<program>", "exec", dont_inherit=True)
        del source
    except any_exception as exc:
        report("ERROR", exc)
        exit_now(2)
    module = module_type("__main__")
    sys.modules["__main__"] = module
    sys.argv = ["<program>"]
    try:
        exec(code, module.__dict__)
    except any_exception as exc:
        settrace(None)
        setprofile(None)
        report("FAIL", exc)
        exit_now(1)
    settrace(None)
    setprofile(None)
    if getpid() != pid:
        exit_now(1)
    try:
        write(report_fd, seal)
    except any_exception:
        exit_now(1)
    exit_now(0)
_judge(int(sys.argv[1]), int(sys.argv[2]))
"""

ERROR_CHARS = 500
MAX_REPORTS = 8  # a program may spam its socket; the first few messages are enough
SPAWN_RETRY_S = 3.0  # a fork bomb that is being killed can hold the pids limit briefly
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def shorten(text, limit=ERROR_CHARS):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Emitter:
    """Writes token-prefixed event lines to stdout, one write per line."""

    def __init__(self, token, on_broken_pipe):
        self._prefix = token.encode("ascii") + b" "
        self._lock = threading.Lock()
        self._on_broken_pipe = on_broken_pipe

    def emit(self, event):
        line = self._prefix + json.dumps(event, ensure_ascii=True).encode("ascii") + b"\n"
        with self._lock:
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(1, view):]
            except OSError:
                self._on_broken_pipe()


def processes():
    """(pid, session, uid) of every live, non-zombie process this runner can see."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
            uid = os.stat("/proc/%s" % name).st_uid
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):
            continue
        yield int(name), int(fields[3]), uid


def kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def kill_session(session):
    """Kill every process of a program's session, including ones that left its group."""
    try:
        os.killpg(session, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(20):  # children forked during a scan are caught by the next one
        members = [pid for pid, sid, _ in processes() if sid == session]
        if not members:
            return
        for pid in members:
            kill_quietly(pid)


def make_undumpable():
    """Stop programs (same uid) from reading this process's memory and fds via /proc."""
    try:
        import ctypes

        pr_set_dumpable = 4
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


def memfd_holding(data):
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("program", 0)
    else:
        fd, path = tempfile.mkstemp()
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def remove_tree(path):
    def make_writable_and_retry(function, failed_path, _exc_info):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


def rlimits_for(program, limits):
    """The prologue applies these: name -> (soft, hard)."""
    cpu_s = math.ceil(program["timeout_s"]) + 1
    megabyte = 1 << 20
    chosen = {
        "RLIMIT_AS": (limits["address_space_mb"] * megabyte,) * 2,
        "RLIMIT_FSIZE": (limits["file_size_mb"] * megabyte,) * 2,
        "RLIMIT_NOFILE": (limits["open_files"],) * 2,
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (cpu_s, cpu_s + 1),
    }
    if limits.get("processes"):
        chosen["RLIMIT_NPROC"] = (limits["processes"],) * 2
    return chosen


class Outcome:
    def __init__(self):
        self.timed_out = False
        self.returncode = None
        self.reports = []  # (sender pid, bytes)
        self.stderr_tail = bytearray()
        self.seconds = 0.0


class Judge:
    def __init__(self, request, emitter):
        self.request = request
        self.emitter = emitter
        self.limits = request["rlimits"]
        self.output_bytes = int(request.get("output_bytes", 64000))
        self.scratch = tempfile.gettempdir()  # TMPDIR, else /tmp: the sandbox's tmpfs
        self.private_pid_namespace = bool(request.get("private_pid_namespace"))
        self.spawn_lock = threading.Lock()
        self.in_flight = set()  # session ids of running programs
        self.own_session = os.getsid(0)
        self.own_uid = os.getuid()

    def run(self, index, program):
        try:
            verdict = self.judge(index, program)
        except Exception as exc:  # a harness bug must cost one verdict, not the shard
            verdict = {"status": "error", "seconds": 0.0, "error": shorten("runner: %r" % exc)}
        self.emitter.emit(dict({"verdict": index}, **verdict))

    def judge(self, index, program):
        nonce = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="program-", dir=self.scratch)
        try:
            proc, channel = self.spawn(program, nonce, workdir)
            if proc is None:
                return {"status": "error", "seconds": 0.0, "error": shorten("could not start: " + channel)}
            self.emitter.emit({"started": index})
            outcome = self.supervise(proc, channel, float(program["timeout_s"]))
        finally:
            remove_tree(workdir)
        return self.decide(outcome, proc.pid, nonce, float(program["timeout_s"]))

    def spawn(self, program, nonce, workdir):
        limits = " ".join("%s=%d,%d" % (name, soft, hard) for name, (soft, hard) in rlimits_for(program, self.limits).items())
        payload = b"\n".join([nonce.encode(), limits.encode(), program["source"].encode("utf-8", "surrogatepass")])
        payload_fd = memfd_holding(payload)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        command = [sys.executable, "-I", "-S", "-c", PROLOGUE, str(payload_fd), str(theirs.fileno())]
        env = dict(PROGRAM_ENV, HOME=workdir, TMPDIR=workdir)
        deadline = time.monotonic() + SPAWN_RETRY_S
        try:
            while True:
                try:
                    # Spawn and registration happen under the lock the stray sweep takes,
                    # so a freshly started program is never mistaken for a stray.
                    with self.spawn_lock:
                        proc = subprocess.Popen(
                            command,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            pass_fds=(payload_fd, theirs.fileno()),
                            cwd=workdir,
                            env=env,
                            start_new_session=True,
                        )
                        self.in_flight.add(proc.pid)
                    return proc, ours
                except (BlockingIOError, MemoryError) as exc:
                    if time.monotonic() > deadline:
                        ours.close()
                        return None, repr(exc)
                    time.sleep(0.05)
                except OSError as exc:
                    ours.close()
                    return None, repr(exc)
        finally:
            os.close(payload_fd)
            theirs.close()

    def supervise(self, proc, channel, timeout_s):
        outcome = Outcome()
        started = time.monotonic()
        deadline = started + timeout_s
        selector = selectors.DefaultSelector()
        selector.register(proc.stderr, selectors.EVENT_READ, self.read_stderr)
        selector.register(channel, selectors.EVENT_READ, self.read_report)
        exit_fd = pidfd_of(proc.pid)
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ, None)
        tick = 1.0 if exit_fd is not None else 0.005
        try:
            while proc.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome.timed_out = True
                    break
                for key, _ in selector.select(min(remaining, tick)):
                    if key.data is not None and not key.data(key.fileobj, outcome):
                        selector.unregister(key.fileobj)
            outcome.seconds = time.monotonic() - started
            kill_session(proc.pid)
            proc.wait()
            outcome.returncode = proc.returncode
            self.drain(proc, channel, outcome)
        finally:
            selector.close()
            if exit_fd is not None:
                os.close(exit_fd)
            proc.stderr.close()
            channel.close()
            with self.spawn_lock:
                self.in_flight.discard(proc.pid)
                if self.private_pid_namespace:
                    self.kill_strays()
        return outcome

    def read_stderr(self, stream, outcome):
        data = os.read(stream.fileno(), 65536)
        if data:
            outcome.stderr_tail += data
            if len(outcome.stderr_tail) > self.output_bytes:
                del outcome.stderr_tail[: len(outcome.stderr_tail) - self.output_bytes]
        return bool(data)

    def read_report(self, channel, outcome, flags=0):
        data, ancillary, _, _ = channel.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size), flags)
        sender = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender, uid, _ = CREDENTIALS.unpack(value[: CREDENTIALS.size])
                if uid != self.own_uid:
                    sender = None
        if data and len(outcome.reports) < MAX_REPORTS:
            outcome.reports.append((sender, data))
        return bool(data)

    def drain(self, proc, channel, outcome):
        """Collect what the program wrote before it died, without waiting on strays."""
        os.set_blocking(proc.stderr.fileno(), False)
        try:
            for _ in range(64):
                if not self.read_stderr(proc.stderr, outcome):
                    break
        except BlockingIOError:
            pass
        try:
            for _ in range(MAX_REPORTS):
                if not self.read_report(channel, outcome, socket.MSG_DONTWAIT):
                    break
        except BlockingIOError:
            pass

    def kill_strays(self):
        """Kill processes that left their program's session (double fork + setsid)."""
        legitimate = self.in_flight | {self.own_session}
        for pid, session, uid in processes():
            if pid not in (1, os.getpid()) and uid == self.own_uid and session not in legitimate:
                kill_quietly(pid)

    def abandon(self):
        for session in list(self.in_flight):
            kill_session(session)

    def decide(self, outcome, pid, nonce, timeout_s):
        verdict = {"seconds": round(outcome.seconds, 4)}
        own_reports = [data for sender, data in outcome.reports if sender == pid]
        code = outcome.returncode
        if outcome.timed_out:
            return dict(verdict, status="timeout", error="exceeded %gs" % timeout_s)
        if code == 0 and b"PASS " + nonce.encode() in own_reports:
            return dict(verdict, status="passed", error="")
        for data in own_reports:
            kind, _, text = data.decode("utf-8", "replace").partition(" ")
            if kind == "ERROR":
                return dict(verdict, status="error", error=shorten(text))
            if kind == "FAIL":
                return dict(verdict, status="failed", error=shorten(text))
        if code is not None and code < 0:
            signal_name = signal_name_of(-code)
            if -code == signal.SIGXCPU:
                return dict(verdict, status="timeout", error="CPU time limit (%s)" % signal_name)
            return dict(verdict, status="failed", error=shorten("killed by %s %s" % (signal_name, self.last_line(outcome))))
        return dict(
            verdict,
            status="failed",
            error=shorten("exited with status %s before its last statement %s" % (code, self.last_line(outcome))),
        )

    @staticmethod
    def last_line(outcome):
        lines = bytes(outcome.stderr_tail).decode("utf-8", "replace").strip().splitlines()
        return "(%s)" % lines[-1] if lines else ""


def signal_name_of(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


def pidfd_of(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def load_request(argv):
    if len(argv) > 1:
        with open(argv[1], "rb") as f:
            return json.loads(f.read())
    return json.loads(sys.stdin.buffer.read())


def main(argv):
    request = load_request(argv)
    make_undumpable()
    judge = None

    def abort():
        if judge is not None:
            judge.abandon()
        os._exit(4)

    emitter = Emitter(request["token"], abort)
    judge = Judge(request, emitter)
    programs = request["programs"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(request.get("parallel", 1))))
    futures = [pool.submit(judge.run, index, program) for index, program in enumerate(programs)]
    _, unfinished = concurrent.futures.wait(futures, timeout=float(request["deadline_s"]))
    if unfinished:
        # The host's watchdog should have fired first; this one covers a host that died.
        judge.abandon()
        os._exit(3)
    pool.shutdown()
    emitter.emit({"finished": len(programs)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
