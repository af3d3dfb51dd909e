"""Replies nobody took (the asker gave up) expire on SQLite too, as Redis expires them by TTL."""

import sqlite3
import time

import pytest

from dlorch.core.wire import Signer
from dlorch.orchestrator.queue import Channel


def _kv_rows(db) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from kv where key like 'reply:%'").fetchone()[0]


def test_orphaned_sqlite_replies_are_swept_after_their_ttl_and_taken_ones_leave_nothing(tmp_path):
    db = tmp_path / "q.db"
    ch = Channel(f"sqlite:///{db}", "events", Signer(b"k"))
    for i in range(20):
        ch.put_reply(f"orphan-{i}", {"ok": True})  # their askers gave up
    ch.put_reply("taken", {"ok": True, "n": 1})
    assert ch.take_reply("taken") == {"ok": True, "n": 1}
    assert _kv_rows(db) == 20
    now = time.time()
    assert ch.sweep_replies(now) == 0  # not yet due
    assert ch.sweep_replies(now + ch.REPLY_TTL_S + 1) == 20
    assert _kv_rows(db) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from schedule").fetchone()[0] == 0
    ch.put_reply("late", {"ok": True})  # still answered as before
    assert ch.take_reply("late") == {"ok": True}


def test_put_reply_sweeps_now_and_then_by_itself(tmp_path):
    db = tmp_path / "q.db"
    ch = Channel(f"sqlite:///{db}", "events", Signer(b"k"))
    ch.put_reply("first", {"ok": True})  # the first reply sweeps (nothing is due), the next ones wait a while
    ch.REPLY_TTL_S = -1.0
    ch.put_reply("expired", {"ok": True})  # due at once, swept only at the next sweep
    assert _kv_rows(db) == 2
    ch.REPLY_TTL_S, ch._next_sweep = 300.0, 0.0  # the next sweep is due
    ch.put_reply("last", {"ok": True})
    assert _kv_rows(db) == 2 and ch.take_reply("expired") is None and ch.take_reply("first") == {"ok": True}


def test_a_queue_file_another_process_holds_locked_is_waited_for_then_named(tmp_path):
    import sqlite3
    import threading
    import time

    from dlorch.core.errors import Unreachable

    db = tmp_path / "queue.db"
    url = f"sqlite:///{db}"
    Channel(url, "events", Signer(b"k"))  # the file and its tables exist
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # as a process frozen in the middle of a write holds it
    with pytest.raises(Unreachable, match=r"cannot open queue .*another process holds it"):
        Channel(url, "events", Signer(b"k"), open_wait_s=1.5)
    threading.Timer(1.5, lambda: holder.execute("COMMIT")).start()  # it runs again: the wait ends
    t0 = time.monotonic()
    ch = Channel(url, "events", Signer(b"k"), open_wait_s=60)
    assert 1.0 < time.monotonic() - t0 < 30
    ch.send({"n": 1})
    assert ch.receive(timeout=1)["n"] == 1
