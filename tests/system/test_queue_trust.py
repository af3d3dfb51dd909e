"""The queue at its trust boundary: replies bound to their request, junk dropped, no password in an error; on SQLite and a real redis-server."""

import logging

import pytest

from dlorch.core.errors import DlorchError, Unreachable
from dlorch.core.wire import Signer
from dlorch.orchestrator.queue import Queue


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
    else:
        yield request.getfixturevalue("redis_server").url


def _plant(q: Queue, key: str, data: bytes) -> None:
    """Write raw bytes where the reply to ``key`` lands, as anyone with access to the queue could."""
    conn = getattr(q.events.storage, "conn", None)
    if conn is not None and hasattr(conn, "blpop"):
        conn.rpush(f"dlorch.reply.{q.events.name}.{key}", data)
    else:
        q.events.storage.put_data(f"reply:{key}", data)


@pytest.mark.parametrize("junk", [b"not json", b'{"ok":true}', b'{"ok":true}\n' + b"0" * 64])
def test_junk_under_a_reply_key_is_dropped_not_raised(queue_url, junk, caplog):
    q = Queue(queue_url, Signer(b"s"))
    _plant(q, "r1", junk)
    with caplog.at_level(logging.WARNING, logger="dlorch.queue"):
        assert q.events.take_reply("r1") is None
    assert q.events.rejected == 1
    assert any("rejected a reply" in r.message for r in caplog.records)


def test_a_signed_reply_moved_to_another_request_is_refused(queue_url):
    q = Queue(queue_url, Signer(b"s"))
    q.events.put_reply("r1", {"ok": True, "drain": True})
    recorded = q.events.storage.pop_data("reply:r1") if not hasattr(getattr(q.events.storage, "conn", None), "blpop") \
        else q.events.storage.conn.lpop("dlorch.reply.events.r1")
    _plant(q, "r2", recorded)  # a recorded reply replayed to another request
    assert q.events.take_reply("r2") is None
    assert q.events.rejected == 1


def test_a_request_answered_only_by_junk_ends_as_unreachable_not_a_crash(queue_url):
    q = Queue(queue_url, Signer(b"s"))

    class Planting:  # plants junk under the reply key of every request sent
        def __init__(self, ch):
            self.ch = ch

        def __getattr__(self, name):
            return getattr(self.ch, name)

        def send(self, message, priority=0):
            self.ch.send(message, priority)
            _plant(q, message["rid"], b"junk")

    q.events = Planting(q.events)
    with pytest.raises(Unreachable):
        q.request({"type": "ping"}, timeout=0.5, retry_every=0.2)
    assert issubclass(Unreachable, DlorchError)


def test_an_unreachable_queue_does_not_print_its_password():
    from tests.conftest import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(Unreachable) as e:
        Queue(url, Signer(b"s")).jobs.size()
    assert "hunter2" not in str(e.value) and ":***@127.0.0.1" in str(e.value)


def test_the_cli_never_prints_or_logs_a_queue_password(home, tmp_path):
    import shutil
    import signal
    import subprocess

    from tests.conftest import free_port
    from tests.system.harness import cli_env, dlorch, spawn, wait_for

    closed = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = cli_env(DLORCH_SECRET="s3cret-key", DLORCH_STORE=str(tmp_path / "store"))
    cp = dlorch("--queue", closed, "jobs", env=env, check=False)
    assert cp.returncode != 0 and cp.stderr.startswith("error:") and "hunter2" not in cp.stderr + cp.stdout
    assert ":***@127.0.0.1" in cp.stderr

    port = free_port()  # a redis-server that requires the password: the orchestrator logs its queue URL
    server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--requirepass", "hunter2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "up.log"
    try:
        up = spawn("--queue", f"redis://:hunter2@127.0.0.1:{port}/0", "up", env=env, log=log)
        wait_for(lambda: "leading" in log.read_text(errors="replace"), timeout=60, what="the orchestrator to lead")
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
    text = log.read_text(errors="replace")
    assert "hunter2" not in text and ":***@127.0.0.1" in text
