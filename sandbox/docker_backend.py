"""The docker backend: one locked-down container per shard, around sandbox/runner.py.

The container has no network, a read-only root, a small tmpfs /tmp, memory (swap
included), pids and CPU limits, no capabilities, no-new-privileges, an init process, the
non-root user 65534 and no log driver (so output cannot fill the host's disk). The
request goes in on stdin and events come back on stdout through an attach made before
the container starts, so nothing is lost and no host path is mounted. A watchdog in
this process kills the container; containers remove themselves when they end, carry
labels, and leftovers of a killed pipeline are removed the next time a shard starts.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qrobust.sandbox.core import Limits
from qrobust.sandbox.shard import SandboxFailure, Termination, Watchdog

DEFAULT_IMAGE = "qrobust-sandbox:latest"
LABEL = "org.qrobust.sandbox"
OWNER_LABEL = "org.qrobust.sandbox.owner"
DEADLINE_LABEL = "org.qrobust.sandbox.deadline"
RUNNER_SHA_LABEL = "org.qrobust.sandbox.runner-sha256"
SANDBOX_USER = "65534:65534"
REAP_INTERVAL_S = 60.0
REAP_GRACE_S = 60.0
STDERR_TAIL_BYTES = 4096
FRAME_HEADER = struct.Struct(">BxxxL")  # docker's multiplexed stream: kind, 3 pad bytes, length
BUILD_HINT = "qrobust sandbox build"  # runs the build files shipped with the package (docker/)
ENGINE_HINT = "qrobust sandbox engine"

_client_lock = threading.Lock()
_client = None
_last_reap = 0.0


def image_name() -> str:
    return os.environ.get("QROBUST_SANDBOX_IMAGE", DEFAULT_IMAGE)


def runner_sha256() -> str:
    return hashlib.sha256((Path(__file__).parent / "runner.py").read_bytes()).hexdigest()


def api_client():
    """A shared low-level Docker client; raises if no engine answers."""
    global _client
    with _client_lock:
        if _client is None:
            import docker

            _client = docker.from_env(version="auto", timeout=30).api
        return _client


def unavailable_reason() -> str | None:
    """None when the engine answers and holds an up-to-date sandbox image, else why not."""
    try:
        import docker
    except ImportError:
        return "the docker Python package is not installed"
    try:
        api = api_client()
        api.ping()
    except Exception as exc:  # the client raises several unrelated types for 'no engine'
        return f"no Docker engine answers ({_first_line(exc)}); start one with: {ENGINE_HINT}"
    try:
        labels = api.inspect_image(image_name())["Config"].get("Labels") or {}
    except docker.errors.ImageNotFound:
        return f"image {image_name()} is missing; build it with: {BUILD_HINT}"
    except docker.errors.APIError as exc:
        return f"cannot inspect image {image_name()}: {_first_line(exc)}"
    if labels.get(RUNNER_SHA_LABEL) != runner_sha256():
        return f"image {image_name()} holds an older sandbox/runner.py; rebuild it with: {BUILD_HINT}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _process_identity(pid: int) -> str | None:
    """pid plus start time, so a recycled pid is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return f"{pid}:{stat[stat.rindex(b')') + 2:].split()[19].decode()}"


def _owner() -> str:
    return f"{socket.gethostname()}:{_process_identity(os.getpid())}"


def _is_stale(labels: dict, now: float) -> bool:
    try:
        if now > float(labels.get(DEADLINE_LABEL, "inf")) + REAP_GRACE_S:
            return True
    except ValueError:
        return True
    host, _, identity = labels.get(OWNER_LABEL, "").partition(":")
    if host != socket.gethostname() or not identity:
        return False  # another machine's container: only its deadline can retire it
    return _process_identity(int(identity.partition(":")[0])) != identity


def reap_stale_containers(force: bool = False) -> int:
    """Remove sandbox containers whose owner died or whose deadline passed long ago."""
    global _last_reap
    now = time.time()
    if not force and now - _last_reap < REAP_INTERVAL_S:
        return 0
    _last_reap = now
    import docker

    api = api_client()
    removed = 0
    for container in api.containers(all=True, filters={"label": LABEL}):
        if _is_stale(container.get("Labels") or {}, now):
            try:
                api.remove_container(container["Id"], force=True)
                removed += 1
            except docker.errors.APIError:
                pass  # already gone (auto-remove) or being removed
    return removed


class DockerBackend:
    name = "docker"
    private_pid_namespace = True
    limits_processes = False  # the pids cgroup does it; RLIMIT_NPROC would count every uid-65534 process on the host

    def execute(
        self, request: bytes, limits: Limits, watchdog: Watchdog, on_output: Callable[[bytes], None]
    ) -> Termination:
        import docker

        try:
            api = api_client()
            reap_stale_containers()
            container_id = self._create(api, limits, watchdog.total_s)
        except docker.errors.DockerException as exc:
            raise SandboxFailure(_first_line(exc)) from exc
        exit_status: dict = {}
        waiter = threading.Thread(
            target=self._wait_removed, args=(api, container_id, watchdog.total_s, exit_status), daemon=True
        )
        waiter.start()
        try:
            attached = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            api.start(container_id)
        except docker.errors.DockerException as exc:
            self._remove_quietly(api, container_id)
            raise SandboxFailure(_first_line(exc)) from exc
        connection = getattr(attached, "_sock", attached)
        try:
            watchdog_fired, stderr_tail = self._converse(api, container_id, connection, request, watchdog, on_output)
        except BaseException:
            self._remove_quietly(api, container_id)  # auto-remove covers every normal end
            raise
        finally:
            connection.close()
        waiter.join(timeout=10)
        description = watchdog.reason() if watchdog_fired else self._describe(exit_status, stderr_tail)
        return Termination(description, watchdog_fired)

    def _create(self, api, limits: Limits, watchdog_s: float) -> str:
        container_memory = f"{limits.parallel * limits.memory_mb + limits.runner_memory_mb}m"
        host_config = api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={limits.scratch_mb}m,mode=1777"},
            shm_size=f"{limits.scratch_mb}m",
            mem_limit=container_memory,
            memswap_limit=container_memory,
            pids_limit=limits.pids,
            nano_cpus=int(limits.cpus * 1e9),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            auto_remove=True,
            log_config={"type": "none"},
            ulimits=[{"Name": "core", "Soft": 0, "Hard": 0}],
        )
        labels = {LABEL: "runner", OWNER_LABEL: _owner(), DEADLINE_LABEL: str(int(time.time() + watchdog_s) + 1)}
        created = api.create_container(
            image_name(),
            stdin_open=True,  # with detach=False this also sets StdinOnce: our EOF closes its stdin
            user=SANDBOX_USER,
            working_dir="/tmp",
            hostname="sandbox",
            network_disabled=True,
            labels=labels,
            host_config=host_config,
        )
        return created["Id"]

    @staticmethod
    def _wait_removed(api, container_id: str, watchdog_s: float, exit_status: dict) -> None:
        try:
            exit_status.update(api.wait(container_id, timeout=watchdog_s + 60, condition="removed"))
        except Exception as exc:  # the container may already be gone; the status is only for messages
            exit_status["Error"] = _first_line(exc)

    @staticmethod
    def _remove_quietly(api, container_id: str) -> None:
        import docker

        try:
            api.remove_container(container_id, force=True)
        except docker.errors.APIError:
            pass

    def _converse(self, api, container_id, connection, request, watchdog, on_output) -> tuple[bool, bytes]:
        """Send the request, relay stdout frames until the container ends or the watchdog fires."""
        try:
            connection.settimeout(max(watchdog.remaining(), 0.001))
            connection.sendall(request)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the runner died before reading everything; the stream below says what happened
        frames = FrameReader()
        stderr_tail = bytearray()
        while True:
            remaining = watchdog.remaining()
            if remaining <= 0:
                self._kill_quietly(api, container_id)
                return True, bytes(stderr_tail)
            connection.settimeout(remaining)
            try:
                data = connection.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                return False, bytes(stderr_tail)
            for kind, payload in frames.feed(data):
                if kind == 2:
                    stderr_tail = (stderr_tail + payload)[-STDERR_TAIL_BYTES:]
                else:
                    on_output(payload)

    @staticmethod
    def _kill_quietly(api, container_id: str) -> None:
        import docker

        try:
            api.kill(container_id)
        except docker.errors.APIError:
            pass

    @staticmethod
    def _describe(exit_status: dict, stderr_tail: bytes) -> str:
        code = exit_status.get("StatusCode")
        text = f"container exited with status {code}" if code is not None else "container ended"
        if code == 137:
            text += " (SIGKILL: memory limit, or a program killed the runner)"
        last = stderr_tail.decode("utf-8", "replace").strip().splitlines()
        return f"{text}: {last[-1][:200]}" if last else text


class FrameReader:
    """Splits docker's multiplexed attach stream into (stream kind, payload) frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes):
        self._buffer += data
        while len(self._buffer) >= FRAME_HEADER.size:
            kind, length = FRAME_HEADER.unpack_from(self._buffer)
            end = FRAME_HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[FRAME_HEADER.size : end])
            del self._buffer[:end]
            yield kind, payload
