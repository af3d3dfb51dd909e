"""Junk on the queue crashes nothing: a real redis-server, `dlorch up` and an agent subprocess, and whatever
anyone who can write to Redis puts on both channels, before and while a job runs."""

import json
import time
import uuid

from dlorch.core.wire import Signer
from dlorch.orchestrator.queue import Channel
from tests.conftest import synthetic_pair
from tests.system.harness import Cluster, wait_for

SECRET = "junk-test-secret"


def _junk(url: str, round_: int) -> int:
    """Put junk on both channels: bytes, other keys' signatures, signed messages that are not the protocol's,
    one channel's message on the other, a recorded request stamped long ago. Returns how many on each."""
    right, wrong = Signer(SECRET.encode()), Signer(b"another key")
    stale = {"type": "bye", "node": "junk-node", "rid": uuid.uuid4().hex, "sender": "junk-node",
             "sent_at": time.time() - 3600}
    items = {
        "jobs": [b"\x00\xffnot json", b'{"job":"j-1","token":1,"kind":"train"}',
                 wrong.seal({"job": "j-1", "token": 1, "kind": "train", "ch": "jobs"}),
                 right.seal({"job": 5, "token": "x", "kind": "train", "ch": "jobs"}),
                 right.seal({"job": "j-none", "token": [1], "ch": "jobs"}),
                 right.seal({**stale, "ch": "events"})],  # an events message on the jobs channel
        "events": [b"junk", b"[1,2,3]", wrong.seal({**stale, "ch": "events"}),
                   right.seal({"type": "finish", "job": "j-1", "token": {"x": 1}, "ch": "events"}),
                   right.seal({"type": "drain", "node": "n-junk", "ch": "events"}),  # no envelope
                   right.seal({**stale, "ch": "events"}),  # stale
                   right.seal({"job": "j-1", "token": 1, "kind": "train", "ch": "jobs"}),
                   right.seal({"type": "heartbeat", "node": "n-junk", "rid": "0" * 32, "sender": "someone-else",
                               "sent_at": time.time(), "ch": "events"})],  # another node's name
    }
    for name, datas in items.items():
        storage = Channel(url, name, right).storage
        for data in datas:
            storage.enqueue(data, 50 + round_)  # ahead of everything else
    return len(items["jobs"])


def test_an_agent_and_the_orchestrator_take_junk_on_their_channels_and_keep_working(redis_server, home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home, DLORCH_QUEUE=redis_server.url, DLORCH_SECRET=SECRET) as c:
        agent = c.agent("n-junk")
        wait_for(lambda: (home / "ledger" / "nodes" / "n-junk.json").exists(), 60, what="the agent to register")
        _junk(redis_server.url, 0)
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "3")
        c.wait_job(jid, lambda j: j["status"] == "running", 120, what="the job to start")
        _junk(redis_server.url, 1)  # again while it trains: the heartbeat and the reports go on
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300, what="the job to end")
        assert done["status"] == "succeeded" and done["epochs_done"] == 3
        assert [a["node"] for a in done["attempts"]] == ["n-junk"]  # one attempt: its lease never lapsed
        assert agent.poll() is None and c.service.poll() is None
        node = json.loads((home / "ledger" / "nodes" / "n-junk.json").read_text())
        assert node["drain"] is False and node["state"] != "gone"
        agent_log, up_log = c.node_log("n-junk"), (tmp_path / "up.log").read_text(errors="replace")
        assert "malformed dispatch" in agent_log and "rejected a message on jobs" in agent_log
        assert "rejected a message on events" in up_log and "Traceback" not in agent_log + up_log
