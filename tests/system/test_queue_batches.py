"""One orchestrator step reads every waiting request in one Redis command and posts their replies together.

Measured by a real redis-server's own command counts. A round trip per request read and another per reply
capped the no-op block rate at a few hundred a second on a busy machine, and made a thousand agents'
heartbeats queue behind each other.
"""

import uuid

import redis

from dlorch.core.settings import Settings
from dlorch.core.wire import Signer
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.queue import Channel, Queue
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore


def _calls(conn) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in conn.info("commandstats").items()}


def test_a_step_reads_what_waits_in_one_command_and_posts_the_replies_in_two_pipelines(redis_server, tmp_path):
    orch = Orchestrator(Settings(store=str(tmp_path), lease_s=10), Ledger(LocalDirStateStore(tmp_path / "ledger")),
                        Queue(redis_server.url, Signer(b"k")))
    orch.lead()
    orch.step(timeout=0.0)  # the first maintenance
    orch.REQUESTS_BUDGET_S = orch.REPLY_DELAY_S = 60.0  # every request in this step, however slow the machine
    asks = []
    for i in range(20):
        q = Queue(redis_server.url, Signer(b"k"), sender=f"n{i}")
        info = {"id": f"n{i}", "hostname": "h", "pid": 1, "cpus": 2, "memory_bytes": 1, "gpus": [], "torch": "x"}
        for body in ({"type": "register", "node_info": info}, {"type": "heartbeat", "node": f"n{i}"}):
            rid = uuid.uuid4().hex
            q.events.send(q.stamp(body, rid))
            asks.append((q, rid))
    posted, put_replies = [], orch.queue.events.put_replies
    orch.queue.events.put_replies = lambda replies: (posted.append(len(replies)), put_replies(replies))
    conn = redis.Redis.from_url(redis_server.url)
    before = _calls(conn)
    orch.step(timeout=1.0)
    after = _calls(conn)
    assert all((reply := q.events.take_reply(rid)) and reply["ok"] for q, rid in asks)
    ran = {name: after[name] - before.get(name, 0) for name in after}
    assert ran.get("zpopmin", 0) + ran.get("bzpopmin", 0) <= 2  # was: 41, one per request and an empty one
    assert posted == [20, 20]  # the heartbeats' replies, then the others' (a pipeline each); was: 40 round trips
    assert ran.get("rpush", 0) == 40 and ran.get("exec", 0) == 0  # no MULTI/EXEC to answer per command


def test_a_forged_message_among_those_read_together_is_dropped_alone(redis_server):
    ch = Channel(redis_server.url, "events", Signer(b"right"))
    ch.send({"n": 1})
    Channel(redis_server.url, "events", Signer(b"wrong")).send({"n": 2})
    ch.storage.enqueue(b'{"n": 3}', 0)
    ch.send({"n": 4})
    assert ch.receive_waiting(10) == [{"n": 1}, {"n": 4}]
    assert ch.rejected == 2 and ch.receive_waiting(10) == []
