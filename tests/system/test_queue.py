"""The queue contract, run against SQLite (embedded default) and a real redis-server."""

import logging

import pytest

from dlorch.core.errors import Unreachable
from dlorch.core.wire import Signer
from dlorch.orchestrator.queue import Channel, Queue


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
    else:
        server = request.getfixturevalue("redis_server")
        yield server.url


def test_fifo_within_priority(queue_url):
    ch = Channel(queue_url, "jobs", Signer(b"s"))
    for i, prio in enumerate([0, 0, 5, 0, 5]):
        ch.send({"n": i}, priority=prio)
    assert ch.size() == 5
    got = [ch.receive(timeout=1)["n"] for _ in range(5)]
    assert got == [2, 4, 0, 1, 3]
    assert ch.receive(timeout=0.1) is None


def test_forged_and_unsigned_messages_are_dropped_and_logged(queue_url, caplog):
    ch = Channel(queue_url, "jobs", Signer(b"right"))
    Channel(queue_url, "jobs", Signer(b"wrong")).send({"job": "evil"})
    ch.storage.enqueue(b'{"job":"unsigned"}', 0)
    ch.send({"job": "good"})
    with caplog.at_level(logging.WARNING, logger="dlorch.queue"):
        assert ch.receive(timeout=1) == {"job": "good"}
    assert ch.rejected == 2
    assert sum("rejected a message" in r.message for r in caplog.records) == 2
    assert ch.size() == 0


def test_replies(queue_url):
    q = Queue(queue_url, Signer(b"s"))
    q.events.put_reply("r1", {"ok": True})
    assert q.events.take_reply("r1") == {"ok": True}
    assert q.events.take_reply("r1") is None


def test_unreachable_redis_is_one_line():
    ch = Channel("redis://127.0.0.1:1/0", "jobs", Signer(b"s"))
    with pytest.raises(Unreachable, match="cannot reach queue redis://127.0.0.1:1/0"):
        ch.size()
