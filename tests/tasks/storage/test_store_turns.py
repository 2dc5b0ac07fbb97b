"""Processes take turns with the store: a reader or a second writer waits, a dead holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qrobust.tasks.storage.store import StoreBusy, connect, query, record_event

HOLD_THE_STORE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qrobust.tasks.storage.store import connect, record_event
    with connect(Path(sys.argv[1])) as con:
        record_event(con, "cell", "generate", "Completed", shard=0)
        Path(sys.argv[2]).touch()
        time.sleep(float(sys.argv[3]))
""")


def _hold(store, seconds: float, tmp_path) -> subprocess.Popen:
    """Another process that opens the store for writing and keeps it for `seconds`."""
    ready = tmp_path / f"holding-{time.monotonic_ns()}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_STORE, str(store), str(ready), str(seconds)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder did not open the store"
        time.sleep(0.05)
    return holder


def test_a_query_waits_for_a_writer_in_another_process(tmp_path):
    store = tmp_path / "results.duckdb"
    holder = _hold(store, 1.5, tmp_path)
    started = time.monotonic()
    rows = query(store, "SELECT stage FROM stage_events")
    assert time.monotonic() - started > 0.5  # it waited for the writer's turn to end
    assert rows["stage"].tolist() == ["generate"]
    assert holder.wait(timeout=30) == 0


def test_two_processes_write_in_turn(tmp_path):
    store = tmp_path / "results.duckdb"
    holder = _hold(store, 1.0, tmp_path)
    with connect(store) as con:
        record_event(con, "cell", "execute", "Completed", shard=0)
    assert holder.wait(timeout=30) == 0
    assert sorted(query(store, "SELECT stage FROM stage_events")["stage"]) == ["execute", "generate"]


def test_a_writer_killed_mid_turn_leaves_the_store_usable(tmp_path):
    store = tmp_path / "results.duckdb"
    holder = _hold(store, 60, tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with connect(store, wait_s=10) as con:
        record_event(con, "cell", "execute", "Completed", shard=0)
    assert sorted(query(store, "SELECT stage FROM stage_events")["stage"]) == ["execute", "generate"]


def test_a_store_held_too_long_is_a_one_line_error(tmp_path):
    store = tmp_path / "results.duckdb"
    holder = _hold(store, 10, tmp_path)
    try:
        with pytest.raises(StoreBusy, match="stayed locked by another process") as caught:
            with connect(store, read_only=True, wait_s=0.5):
                pass
        assert "\n" not in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
