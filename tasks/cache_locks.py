"""One computation per cache key, across threads, processes and machines sharing a workspace.

Prefect runs a task whose cache policy has `isolation_level="SERIALIZABLE"` inside a lock on
its cache key: a second run of the same key waits for the first, then finds its cached
result instead of computing it again. Prefect's own file lock manager keeps a lock until it
expires, so a holder killed with `kill -9` would block every later run of that key; this one
holds an `fcntl.flock` on a file in the workspace, which the operating system releases when
its holder dies. It works wherever flock does: local disks and NFS (v4, or v3 with lockd).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional

from prefect.locking.protocol import LockManager

POLL_S = 0.1


class WorkspaceLockManager(LockManager):
    """Prefect's lock-manager protocol over flock'd files in one directory."""

    # Locks held by this process, by (directory, key): (holder, open file descriptor). Kept
    # per process, not per instance: Prefect hands each task run its own unpickled copy.
    _held: dict[tuple[str, str], tuple[str, int]] = {}
    _guard = threading.Lock()

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    def __reduce__(self):
        return (type(self), (self.directory,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkspaceLockManager) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def _path(self, key: str) -> str:
        os.makedirs(self.directory, exist_ok=True)
        return os.path.join(self.directory, re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock")

    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        # hold_timeout is not needed: a dead holder's lock is released by the OS.
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        descriptor = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o666)
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(descriptor)
                    return False
                time.sleep(POLL_S)
        with self._guard:
            self._held[(self.directory, key)] = (holder, descriptor)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                            hold_timeout: Optional[float] = None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            held = self._held.get((self.directory, key))
            if held is None or held[0] != holder:
                raise ValueError(f"{holder!r} does not hold the lock on {key!r}")
            del self._held[(self.directory, key)]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def is_locked(self, key: str) -> bool:
        if (self.directory, key) in self._held:
            return True
        path = self._path(key)
        if not os.path.exists(path):
            return False
        descriptor = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return False
        finally:
            os.close(descriptor)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get((self.directory, key))
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True


def one_run_per_key(task, lock_directory: Path):
    """`task`, run inside a lock on its cache key: concurrent identical runs compute it once."""
    policy = task.cache_policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=WorkspaceLockManager(lock_directory)
    )
    return task.with_options(cache_policy=policy)
