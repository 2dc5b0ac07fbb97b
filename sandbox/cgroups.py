"""cgroup limits (memory with swap, pids, CPU quota) for a bubblewrap sandbox, when root.

bubblewrap has no resource limits of its own. Where this process is root and the cgroup
filesystem is writable, each sandbox gets a cgroup nested under this process's own (so
any limit on the caller still applies) with the same memory, pids and CPU limits as a
docker container. A shell joins the cgroups and then execs the sandbox, so no process of
the sandbox ever runs outside them. Both cgroup v2 and v1 (one hierarchy per
controller) are handled; anywhere else the sandbox runs with per-program rlimits only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qrobust.sandbox.core import Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP_NAME = "qrobust-sandbox"
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "pids", "cpu")
JOIN_THEN_EXEC = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
_names = itertools.count()


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of `controller`, or in v2 (None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller in controllers.split(",")):
            return path.lstrip("/")
    raise OSError(f"no cgroup line for {controller or 'v2'} in /proc/self/cgroup")


def _is_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _parents() -> list[tuple[str | None, Path]]:
    if _is_v2():
        return [(None, CGROUP_ROOT / _own_path(None) / GROUP_NAME)]
    return [(name, CGROUP_ROOT / name / _own_path(name) / GROUP_NAME) for name in V1_CONTROLLERS]


def _settings(controller: str | None, limits: Limits) -> dict[str, str]:
    memory = (limits.parallel * limits.memory_mb + limits.runner_memory_mb) << 20
    quota = int(limits.cpus * CPU_PERIOD_US)
    if controller is None:
        return {
            "memory.max": str(memory),
            "memory.swap.max": "0",
            "pids.max": str(limits.pids),
            "cpu.max": f"{quota} {CPU_PERIOD_US}",
        }
    return {
        "memory": {"memory.limit_in_bytes": str(memory), "memory.memsw.limit_in_bytes": str(memory)},
        "pids": {"pids.max": str(limits.pids)},
        "cpu": {"cpu.cfs_period_us": str(CPU_PERIOD_US), "cpu.cfs_quota_us": str(quota)},
    }[controller]


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:  # memsw files exist only with swap accounting, when there is swap to limit
            raise


def _remove_stale(parent: Path) -> None:
    """Remove empty cgroups left by processes that died before cleaning up."""
    for child in parent.iterdir() if parent.is_dir() else ():
        owner = child.name.partition("-")[0]
        if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                child.rmdir()


@dataclass(frozen=True)
class SandboxCgroup:
    directories: tuple[Path, ...]  # one per hierarchy (v1), or one (v2)

    @property
    def join_prefix(self) -> list[str]:
        """Command prefix that moves itself into these cgroups, then execs the rest."""
        return ["/bin/sh", "-c", JOIN_THEN_EXEC, "sh", *(str(d / "cgroup.procs") for d in self.directories), "--"]

    def remove(self) -> None:
        for directory in self.directories:
            for _ in range(50):  # the sandbox's last processes may still be exiting
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            # An empty parent left behind would keep our caller's own cgroup from being removed.
            with contextlib.suppress(OSError):
                directory.parent.rmdir()


def _make_child(parent: Path, name: str, controller: str | None) -> Path:
    for _ in range(3):  # another sandbox may remove the shared parent between our mkdirs
        parent.mkdir(exist_ok=True)
        _remove_stale(parent)
        try:
            if controller is None:
                with contextlib.suppress(OSError):  # refused when our own cgroup holds processes
                    _write(parent.parent / "cgroup.subtree_control", "+memory +pids +cpu")
                _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
            (parent / name).mkdir()
            return parent / name
        except FileNotFoundError:
            continue
    raise OSError(f"cannot create {parent / name}")


def create(limits: Limits) -> SandboxCgroup:
    """A fresh cgroup (per hierarchy) with these limits; raises OSError where not possible."""
    name = f"{os.getpid()}-{next(_names)}"
    created: list[Path] = []
    try:
        for controller, parent in _parents():
            directory = _make_child(parent, name, controller)
            created.append(directory)
            for file, value in _settings(controller, limits).items():
                _write(directory / file, value, optional=file.startswith("memory.memsw") or file == "memory.swap.max")
    except OSError:
        SandboxCgroup(tuple(created)).remove()
        raise
    return SandboxCgroup(tuple(created))


def unavailable_reason() -> str | None:
    """None when sandbox cgroups can be created and joined here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    import subprocess

    try:
        group = create(Limits())
    except OSError as exc:
        return f"cannot create cgroups: {exc}"
    try:
        result = subprocess.run([*group.join_prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot join cgroups: {exc}"
    finally:
        group.remove()
    if result.returncode != 0:
        return f"cannot join cgroups: {result.stderr.decode(errors='replace').strip()[:200]}"
    return None
