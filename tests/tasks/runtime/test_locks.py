"""The cache-key lock: one holder at a time, across processes, released when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qrobust.tasks.runtime.locks import FifoLock, is_locked, key_lock

HOLD_A_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qrobust.tasks.runtime.locks import key_lock
    with key_lock(Path(sys.argv[1]), "key"):
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


def test_a_key_has_one_holder_at_a_time_even_within_one_process(tmp_path):
    with key_lock(tmp_path, "key"):
        assert is_locked(tmp_path, "key")
        with pytest.raises(TimeoutError, match="stayed held"):
            with key_lock(tmp_path, "key", timeout_s=0.3):
                pass
    assert not is_locked(tmp_path, "key")
    with key_lock(tmp_path, "key", timeout_s=0.3):
        pass


def test_a_lock_held_by_another_process_is_waited_for(tmp_path):
    holder = _locked_elsewhere(tmp_path / "locks", tmp_path)
    try:
        assert is_locked(tmp_path / "locks", "key")
        with pytest.raises(TimeoutError):
            with key_lock(tmp_path / "locks", "key", timeout_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_releases_its_lock(tmp_path):
    holder = _locked_elsewhere(tmp_path / "locks", tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert not is_locked(tmp_path / "locks", "key")
    with key_lock(tmp_path / "locks", "key", timeout_s=5):
        pass


def test_the_fifo_lock_is_granted_in_the_order_it_was_asked_for():
    lock, order, started = FifoLock(), [], []

    def worker(index: int) -> None:
        started.append(index)
        with lock.held():
            order.append(index)

    with lock.held():
        threads = []
        for index in range(5):
            thread = threading.Thread(target=worker, args=(index,))
            thread.start()
            while len(started) <= index:  # each asks before the next starts
                time.sleep(0.01)
            time.sleep(0.05)
            threads.append(thread)
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]
