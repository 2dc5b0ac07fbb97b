"""Judge untrusted Python programs, each in its own process. Standard library only.

This file runs inside the sandbox: the container image holds a copy, the bubblewrap
backend mounts one, and the unisolated backend 'none' runs it as a plain subprocess. It
must import nothing but the standard library and must not know the pipeline.

Protocol
    stdin, or the file named by argv[1]: one JSON request
        {"token": str, "programs": [{"source": str, "timeout_s": float}, ...],
         "parallel": int, "rlimits": {...}, "output_bytes": int,
         "private_pid_namespace": bool, "deadline_s": float}
    stdout: one line per event, "<token> <json>", each written with a single write:
        {"started": i}                                   program i is about to be forked
        {"verdict": i, "status": s, "seconds": t, "error": e}
        {"finished": n}                                  all n programs were judged
        {"alive": true}                                  a heartbeat, every second
    The token lets the host ignore anything a program manages to write into this
    process's stdout, for example through /proc/1/fd/1: the sandbox's init (docker-init,
    or bubblewrap's) runs as the programs' uid and is readable by them; it holds no
    secret, only the same stdout.

Verdicts
    passed   the program ran to its last statement, in the process that was started
    failed   it raised, exited early, was killed by a signal, or broke the rules
    timeout  it exceeded its wall-clock limit (or its CPU-time backstop)
    error    the harness could not judge it: it does not compile, or could not be started

Processes
    Programs are forked from a zygote: a fresh interpreter (`python3 -I -S`) that holds
    no request, token or other program's data, marks itself non-dumpable and forks one
    child per program on request. Forking costs a fraction of starting an interpreter,
    and non-dumpable children cannot read or ptrace one another through /proc even
    though they share a uid. Each child starts its own session, dies with the zygote
    (which dies with the runner), gets /dev/null as stdin and stdout, a pipe as stderr
    (only a tail of `output_bytes` is kept), its own scratch directory and a clean
    environment, and then runs the prologue below.

How "passed" is established, and the threat model
    The prologue reads a payload (a fresh random nonce, rlimits and the source) from a
    memfd, closes it, sets the rlimits (address space, processes, file size, open files,
    CPU-time backstop, no core files) and exec()s the program in a fresh __main__ module.
    Only when exec() returns normally, in the process that was forked (os.getpid()
    unchanged), does it send "PASS <nonce>" over a private AF_UNIX SOCK_SEQPACKET socket
    and _exit(0). The runner accepts a pass only if
      - the message equals "PASS <nonce>" for this program's nonce,
      - the kernel-attested sender (SCM_CREDENTIALS) is the forked process itself,
        so a child of the program can never report, even if it learned the nonce,
      - and that process then exited with status 0.
    Exit status 0 alone proves nothing. This defeats sys.exit(0) / raise SystemExit
    before or inside the tests (exec raises), os._exit(0) (no message), printing a fake
    marker (stdout is discarded; the socket is separate), writing a guessed marker to the
    socket (wrong nonce), monkeypatching os.write / os._exit / sys / builtins (the
    prologue bound private references to everything it needs, exception classes
    included, before the program ran), and fork-and-let-the-child-finish (pid check and
    kernel credentials).

    What an in-process attacker can still do: code that deliberately introspects the
    interpreter (walks frames with sys._getframe, searches gc.get_objects, reads
    /proc/self/mem) can find the nonce and the socket in its own process and forge a
    pass for ITSELF. No in-process scheme can prevent that: the prologue and the program
    share one address space. It cannot forge a pass for another program (each has its
    own socket and nonce, sockets cannot be reopened through /proc, and programs cannot
    read each other's memory), nor verdict lines (it never sees the token), and it gains
    nothing outside the sandbox. Verdict integrity is aimed at model-generated code,
    which cheats by accident (exits early, swallows failures), not at code written to
    attack this harness; host isolation does not depend on it at all.

Containment inside the sandbox (the sandbox itself is the real boundary)
    When a program ends, everything left in its session is killed; inside a private PID
    namespace, any process that escaped into a session of its own is killed too. A
    program that kills the runner or the zygote (all programs share one uid) ends the
    shard early; the host sees which programs had started and re-runs the rest, so one
    program cannot take the others down.
"""

import array
import concurrent.futures
import json
import math
import os
import queue
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

# Runs in the program's process before the program. Everything it needs after the program
# has run is bound to a local first, since the program may rebind any global or builtin.
PROLOGUE = r"""
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
        os.set_inheritable(report_fd, False)  # a program that exec()s must not pass it on
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
"""

# The zygote: serves fork requests on a SOCK_SEQPACKET socket, reaps its children and
# reports their wait statuses. Requests carry the fds [payload, report, stderr].
ZYGOTE = (
    r"""
import array, fcntl, json, os, resource, selectors, signal, socket, sys
"""
    + PROLOGUE
    + r"""
PROGRAM_FDS = 5  # stdin, stdout, stderr, payload, report
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4


def _prctl(option, value):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(option, value, 0, 0, 0)
    except Exception:
        pass


def _die_with(parent):
    # Without it, killing the runner would orphan programs on the unisolated backend.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _serve(control_fd, runner):
    control = socket.socket(fileno=control_fd)
    _die_with(runner)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # inherited: under memory pressure, kill programs, not the runner
    except OSError:
        pass
    _prctl(PR_SET_DUMPABLE, 0)  # inherited by every fork
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wake_r, selectors.EVENT_READ, "children")
    while True:
        for key, _ in selector.select():
            if key.data == "control":
                _fork_requested(control)
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(control)


def _fork_requested(control):
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(65536, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not message:
        os._exit(0)  # the runner is gone
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        reply = {"error": repr(exc)}
    else:
        if pid == 0:
            _become_program(json.loads(message), list(fds), zygote)
        reply = {"pid": pid}
    for fd in fds:
        os.close(fd)
    control.send(json.dumps(reply).encode())


def _reap(control):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(json.dumps({"exit": pid, "status": status}).encode())


def _become_program(request, fds, zygote):
    try:
        _die_with(zygote)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        payload, report, stderr = fds
        # Duplicate above the target slots first so that no dup2 clobbers a source.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in (devnull, devnull, stderr, payload, report)]
        for target, fd in enumerate(sources):
            os.dup2(fd, target)
        os.closerange(PROGRAM_FDS, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
    except BaseException as exc:
        try:
            os.write(2, ("program set-up failed: %r\n" % (exc,)).encode())
        finally:
            os._exit(127)
    _judge(3, 4)
    os._exit(1)


_serve(int(sys.argv[1]), int(sys.argv[2]))
"""
)

ERROR_CHARS = 500
MAX_REPORTS = 8  # a program may spam its socket; the first few messages are enough
SPAWN_RETRY_S = 3.0  # a fork bomb that is being killed can hold the pids limit briefly
EXIT_STATUS_WAIT_S = 5.0
ZYGOTE_REPLY_S = 10.0
HEARTBEAT_S = 1.0
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
        self._closed = False

    def emit(self, event):
        line = self._prefix + json.dumps(event, ensure_ascii=True).encode("ascii") + b"\n"
        with self._lock:
            if self._closed:
                return
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(1, view) :]
                return
            except OSError:
                self._closed = True
        self._on_broken_pipe("stdout closed")

    def close(self):
        """No event after this: verdicts of programs killed while aborting would be wrong."""
        with self._lock:
            self._closed = True


class SpawnError(Exception):
    pass


class Zygote:
    """Runner-side handle: fork requests go out, pids and exit statuses come back."""

    def __init__(self, on_death):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", ZYGOTE, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        theirs.close()
        self.control = ours
        self.request_lock = threading.Lock()  # one request at a time: replies come in order
        self.replies = queue.Queue()
        self.guard = threading.Lock()
        self.statuses = {}  # pid -> wait status, until collected
        self.watchers = {}  # pid -> write end of a pipe, closed when that pid exits
        self.on_death = on_death
        threading.Thread(target=self._dispatch, daemon=True).start()

    def fork(self, fds, cwd, env):
        """Fork a program; returns (pid, fd that becomes readable once it has exited)."""
        header = json.dumps({"cwd": cwd, "env": env}).encode()
        with self.request_lock:
            try:
                self.control.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except OSError:
                self.on_death("the zygote died (a program killed it, or it ran out of memory)")
                raise SpawnError("the zygote died") from None
            try:
                reply = self.replies.get(timeout=ZYGOTE_REPLY_S)
            except queue.Empty:
                self.on_death("the zygote stopped answering (a program stopped it?)")
                raise SpawnError("the zygote stopped answering") from None
        if "error" in reply:
            raise SpawnError(reply["error"])
        pid = reply["pid"]
        exited_r, exited_w = os.pipe()
        with self.guard:
            if pid in self.statuses:
                os.close(exited_w)
            else:
                self.watchers[pid] = exited_w
        return pid, exited_r

    def exit_status(self, pid):
        with self.guard:
            return self.statuses.pop(pid, None)

    def _dispatch(self):
        while True:
            try:
                data = self.control.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "exit" in message:
                with self.guard:
                    self.statuses[message["exit"]] = message["status"]
                    watcher = self.watchers.pop(message["exit"], None)
                if watcher is not None:
                    os.close(watcher)
            else:
                self.replies.put(message)
        self.on_death("the zygote died (a program killed it, or it ran out of memory)")


def processes():
    """(pid, session) of every live, non-zombie process this runner can see."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        yield int(name), int(fields[3])


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
        members = [pid for pid, sid in processes() if sid == session]
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
        view = view[os.write(fd, view) :]
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


def payload_for(program, nonce, limits):
    rlimits = " ".join(f"{name}={soft},{hard}" for name, (soft, hard) in rlimits_for(program, limits).items())
    return b"\n".join([nonce.encode(), rlimits.encode(), program["source"].encode("utf-8", "surrogatepass")])


class Running:
    """One forked program and the runner's ends of its pipes."""

    def __init__(self, pid, exited_fd, stderr_fd, channel):
        self.pid = pid
        self.exited_fd = exited_fd
        self.stderr_fd = stderr_fd
        self.channel = channel
        self.started = time.monotonic()
        self.timed_out = False
        self.returncode = None
        self.seconds = 0.0
        self.reports = []  # (sender pid, bytes)
        self.stderr_tail = bytearray()

    def close(self):
        for fd in (self.exited_fd, self.stderr_fd):
            os.close(fd)
        self.channel.close()


class Judge:
    def __init__(self, request, emitter, zygote):
        self.emitter = emitter
        self.zygote = zygote
        self.limits = request["rlimits"]
        self.output_bytes = int(request.get("output_bytes", 64000))
        self.scratch = tempfile.gettempdir()  # TMPDIR, else /tmp: the sandbox's tmpfs
        self.private_pid_namespace = bool(request.get("private_pid_namespace"))
        self.spawn_lock = threading.Lock()
        self.in_flight = {}  # session id -> the Running that owns it
        self.own_session = os.getsid(0)
        self.own_uid = os.getuid()

    def run(self, index, program):
        try:
            verdict = self.judge(index, program)
        except Exception as exc:  # a harness bug must cost one verdict, not the shard
            verdict = {"status": "error", "seconds": 0.0, "error": shorten(f"runner: {exc!r}")}
        self.emitter.emit(dict({"verdict": index}, **verdict))

    def judge(self, index, program):
        nonce = secrets.token_hex(16)
        timeout_s = float(program["timeout_s"])
        workdir = tempfile.mkdtemp(prefix="program-", dir=self.scratch)
        try:
            # Announced before the fork: a program can kill this runner before fork() returns.
            self.emitter.emit({"started": index})
            try:
                running = self.spawn(payload_for(program, nonce, self.limits), workdir)
            except SpawnError as exc:
                return {"status": "error", "seconds": 0.0, "error": shorten(f"could not start: {exc}")}
            try:
                self.supervise(running, timeout_s)
            finally:
                running.close()
        finally:
            remove_tree(workdir)
        return self.decide(running, nonce, timeout_s)

    def spawn(self, payload, workdir):
        payload_fd = memfd_holding(payload)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        stderr_r, stderr_w = os.pipe()
        env = dict(PROGRAM_ENV, HOME=workdir, TMPDIR=workdir)
        deadline = time.monotonic() + SPAWN_RETRY_S
        try:
            while True:
                try:
                    # Fork and registration happen under the lock the stray sweep takes,
                    # so a freshly forked program is never mistaken for a stray.
                    with self.spawn_lock:
                        pid, exited_fd = self.zygote.fork([payload_fd, theirs.fileno(), stderr_w], workdir, env)
                        running = Running(pid, exited_fd, stderr_r, ours)
                        self.in_flight[pid] = running
                    return running
                except SpawnError:
                    if time.monotonic() > deadline:
                        ours.close()
                        os.close(stderr_r)
                        raise
                    time.sleep(0.05)
        finally:
            os.close(payload_fd)
            os.close(stderr_w)
            theirs.close()

    def supervise(self, running, timeout_s):
        deadline = running.started + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(running.stderr_fd, selectors.EVENT_READ, self.read_stderr)
            selector.register(running.channel, selectors.EVENT_READ, self.read_report)
            selector.register(running.exited_fd, selectors.EVENT_READ, None)
            exited = False
            while not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    running.timed_out = True
                    break
                for key, _ in selector.select(remaining):
                    if key.data is None:
                        exited = True
                    elif not key.data(running):
                        selector.unregister(key.fileobj)
        running.seconds = time.monotonic() - running.started
        with self.spawn_lock:
            if self.in_flight.get(running.pid) is running:  # never a recycled pid's session
                kill_session(running.pid)
                del self.in_flight[running.pid]
            if self.private_pid_namespace:
                self.kill_strays()
        # Without a status (the zygote was stopped), the program cannot count as passed.
        if exited or select_readable(running.exited_fd, EXIT_STATUS_WAIT_S):
            status = self.zygote.exit_status(running.pid)
        else:
            status = None
        running.returncode = None if status is None else os.waitstatus_to_exitcode(status)
        self.drain(running)

    def read_stderr(self, running, flags=None):
        data = os.read(running.stderr_fd, 65536)
        if data:
            running.stderr_tail += data
            if len(running.stderr_tail) > self.output_bytes:
                del running.stderr_tail[: len(running.stderr_tail) - self.output_bytes]
        return bool(data)

    def read_report(self, running, flags=0):
        data, ancillary, _, _ = running.channel.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size), flags)
        sender = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _ = CREDENTIALS.unpack(value[: CREDENTIALS.size])
                sender = pid if uid == self.own_uid else None
        if data and len(running.reports) < MAX_REPORTS:
            running.reports.append((sender, data))
        return bool(data)

    def drain(self, running):
        """Collect what the program wrote before it died, without waiting on strays."""
        os.set_blocking(running.stderr_fd, False)
        try:
            for _ in range(64):
                if not self.read_stderr(running):
                    break
        except BlockingIOError:
            pass
        try:
            for _ in range(MAX_REPORTS):
                if not self.read_report(running, socket.MSG_DONTWAIT):
                    break
        except BlockingIOError:
            pass

    def kill_strays(self):
        """Kill processes that left their program's session (double fork + setsid).

        Only inside a private PID namespace, where every process but init is ours; one
        we may not signal is simply not killed.
        """
        legitimate = set(self.in_flight) | {self.own_session}
        for pid, session in processes():
            if pid not in (1, os.getpid(), self.zygote.process.pid) and session not in legitimate:
                kill_quietly(pid)

    def abandon(self):
        for session in list(self.in_flight):
            kill_session(session)

    def decide(self, running, nonce, timeout_s):
        verdict = {"seconds": round(running.seconds, 4)}
        own_reports = [data for sender, data in running.reports if sender == running.pid]
        code = running.returncode
        if running.timed_out:
            return dict(verdict, status="timeout", error=f"exceeded {timeout_s:g}s")
        if code == 0 and b"PASS " + nonce.encode() in own_reports:
            return dict(verdict, status="passed", error="")
        for data in own_reports:
            kind, _, text = data.decode("utf-8", "replace").partition(" ")
            if kind == "ERROR":
                return dict(verdict, status="error", error=shorten(text))
            if kind == "FAIL":
                return dict(verdict, status="failed", error=shorten(text))
        if code is not None and code < 0:
            if -code == signal.SIGXCPU:
                return dict(verdict, status="timeout", error="CPU time limit (SIGXCPU)")
            return dict(
                verdict,
                status="failed",
                error=shorten(f"killed by {signal_name_of(-code)} {last_line(running)}"),
            )
        return dict(
            verdict,
            status="failed",
            error=shorten(f"exited with status {code} before its last statement {last_line(running)}"),
        )


def last_line(running):
    lines = bytes(running.stderr_tail).decode("utf-8", "replace").strip().splitlines()
    return f"({lines[-1]})" if lines else ""


def select_readable(fd, timeout_s):
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout_s))


def signal_name_of(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def heartbeat(emitter):
    """Lets the host tell a busy runner from a frozen or starved one."""
    while True:
        time.sleep(HEARTBEAT_S)
        emitter.emit({"alive": True})


def load_request(argv):
    if len(argv) > 1:
        with open(argv[1], "rb") as f:
            return json.loads(f.read())
    return json.loads(sys.stdin.buffer.read())


def main(argv):
    request = load_request(argv)
    make_undumpable()
    judge = None

    def abort(reason):
        emitter.close()
        if judge is not None:
            judge.abandon()
        os.write(2, (f"runner: {reason}\n").encode())
        os._exit(4)

    emitter = Emitter(request["token"], abort)
    threading.Thread(target=heartbeat, args=(emitter,), daemon=True).start()
    zygote = Zygote(abort)
    judge = Judge(request, emitter, zygote)
    programs = request["programs"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(request.get("parallel", 1))))
    futures = [pool.submit(judge.run, index, program) for index, program in enumerate(programs)]
    _, unfinished = concurrent.futures.wait(futures, timeout=float(request["deadline_s"]))
    if unfinished:
        abort("deadline passed")  # the host's watchdog should have fired first; it may have died
    pool.shutdown()
    emitter.emit({"finished": len(programs)})
    os._exit(0)  # no interpreter teardown: the zygote's dispatcher must not see it die first


if __name__ == "__main__":
    main(sys.argv)
