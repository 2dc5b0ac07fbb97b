"""The cache-key lock: one holder at a time, across processes, released when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from qrobust.tasks.runtime.locks import WorkspaceLockManager

HOLD_A_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qrobust.tasks.runtime.locks import WorkspaceLockManager
    WorkspaceLockManager(Path(sys.argv[1])).acquire_lock("key", holder="other process")
    Path(sys.argv[2]).touch()
    time.sleep(60)
""")


def _locked_elsewhere(directory, tmp_path) -> subprocess.Popen:
    ready = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(directory), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
        time.sleep(0.05)
    return holder


def test_a_key_has_one_holder_at_a_time(tmp_path):
    locks = WorkspaceLockManager(tmp_path)
    assert locks.acquire_lock("key", holder="a")
    assert locks.is_locked("key") and locks.is_lock_holder("key", "a") and not locks.is_lock_holder("key", "b")
    assert not locks.acquire_lock("key", holder="b", acquire_timeout=0.3)
    locks.release_lock("key", holder="a")
    assert not locks.is_locked("key")
    assert locks.acquire_lock("key", holder="b", acquire_timeout=0.3)
    locks.release_lock("key", holder="b")


def test_a_lock_held_by_another_process_is_waited_for(tmp_path):
    holder = _locked_elsewhere(tmp_path / "locks", tmp_path)
    try:
        locks = WorkspaceLockManager(tmp_path / "locks")
        assert locks.is_locked("key")
        assert not locks.acquire_lock("key", holder="here", acquire_timeout=0.3)
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_releases_its_lock(tmp_path):
    holder = _locked_elsewhere(tmp_path / "locks", tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    locks = WorkspaceLockManager(tmp_path / "locks")
    assert not locks.is_locked("key")
    assert locks.acquire_lock("key", holder="here", acquire_timeout=5)
    locks.release_lock("key", holder="here")


def test_the_lock_manager_travels_to_other_processes_by_its_directory(tmp_path):
    import pickle

    locks = WorkspaceLockManager(tmp_path)
    assert pickle.loads(pickle.dumps(locks)) == locks
