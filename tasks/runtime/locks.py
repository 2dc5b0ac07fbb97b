"""Locks that the operating system releases when their holder dies.

`key_lock` makes one computation per cache key across threads, processes and machines sharing a
workspace: a second run of the same key waits for the first, then finds its artifact. It holds
an `fcntl.flock` on a file in the workspace, which the OS drops if the holder is killed (even
by `kill -9`), so no stale lock ever blocks a later run. It works wherever flock does: local
disks and NFS (v4, or v3 with lockd). `FifoLock` hands one resource (a device) to threads of
one process in the order they asked for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterator

POLL_S = 0.1


def lock_path(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / (re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".lock")


@contextlib.contextmanager
def key_lock(directory: Path, name: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock `name` in `directory`; TimeoutError after `timeout_s` of waiting."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    descriptor = os.open(lock_path(directory, name), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"lock {name!r} in {directory} stayed held for {timeout_s:g}s") from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def is_locked(directory: Path, name: str) -> bool:
    path = lock_path(directory, name)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    finally:
        os.close(descriptor)


class FifoLock:
    """A lock granted in the order it was asked for (threading.Lock makes no such promise)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            self._condition.wait_for(lambda: self._queue[0] is ticket)
        try:
            yield
        finally:
            with self._condition:
                self._queue.popleft()
                self._condition.notify_all()
