"""The agent at its trust boundary: junk and replays on its channels are logged and dropped, reports never
carry a number JSON has not, and a message it puts back keeps its priority (a real SQLite queue; the
orchestrator, where one answers, is the real one in a thread)."""

import logging
import math
import threading
from contextlib import contextmanager

import pytest

from dlorch.core.protocol import Dispatch
from dlorch.core.settings import Settings
from dlorch.core.spec import JobStatus
from dlorch.core.wire import Signer
from dlorch.nodeagent.agent import Agent
from dlorch.orchestrator.queue import Channel
from tests.unit.test_orchestrator import _register, _submit, _take


@pytest.fixture
def agent(tmp_path):
    s = Settings(store=str(tmp_path), queue=f"sqlite:///{tmp_path / 'q.db'}", secret="k", heartbeat_s=0.5)
    return Agent(s, node_id="n1", workdir=tmp_path / "agent")


class _Wrap:
    """A channel whose ``send`` or ``receive`` also does something a test injects (the rest is the channel's)."""

    def __init__(self, ch: Channel, after_send=None, after_receive=None):
        self.ch, self.after_send, self.after_receive = ch, after_send, after_receive

    def __getattr__(self, name):
        return getattr(self.ch, name)

    def send(self, message, priority=0):
        self.ch.send(message, priority)
        if self.after_send:
            self.after_send(message)

    def receive(self, timeout=1.0):
        got = self.ch.receive(timeout)
        if self.after_receive:
            self.after_receive(got)
        return got


@contextmanager
def _serving(o):
    """The orchestrator's loop in a thread, for as long as the block runs."""
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            o.step(timeout=0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_junk_on_the_jobs_channel_is_dropped_and_the_agent_goes_on(agent, caplog):
    jobs = agent.queue.jobs
    jobs.storage.enqueue(b"\x00junk", 0)
    Channel(jobs.url, "jobs", Signer(b"wrong")).send({"job": "j-1", "token": 1, "kind": "train"})
    jobs.send({"job": 5, "token": "x", "kind": "train"})  # signed with the right key, but no dispatch
    Channel(jobs.url, "events", Signer(b"k")).send({"type": "bye", "node": "n1"})
    jobs.storage.enqueue(agent.queue.events.storage.dequeue(), 0)  # signed for the other channel
    with caplog.at_level(logging.WARNING):
        while jobs.size():
            assert agent.step() is True
    assert jobs.rejected == 3
    assert any("malformed dispatch" in r.getMessage() for r in caplog.records)


def test_a_malformed_reply_neither_drains_nor_ends_the_heartbeat(agent, caplog):
    events = agent._hb_queue.events
    agent._hb_queue.events = _Wrap(events, after_send=lambda m: events.put_reply(
        m["rid"], {"ok": True, "drain": "yes", "jobs_gone": 5, "lease": "no"}))  # signed and bound, yet junk
    with caplog.at_level(logging.WARNING):
        agent.heartbeat_once()
    assert not agent.stop.is_set()
    assert any("malformed HeartbeatReply" in r.getMessage() for r in caplog.records)


def test_a_replayed_drain_reply_does_not_stop_the_agent(agent):
    events = agent._hb_queue.events
    recorded = Signer(b"k").seal({"ok": True, "drain": True, "reply_to": "0" * 32})  # the reply to another request
    agent._hb_queue.events = _Wrap(events, after_send=lambda m: events.storage.put_data(f"reply:{m['rid']}", recorded))
    agent.heartbeat_once()  # no orchestrator answers: the replay is refused, the wait ends unanswered
    assert not agent.stop.is_set() and events.rejected >= 1


def test_the_heartbeat_thread_outlives_an_unexpected_error(agent):
    calls = []

    def beat():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        if len(calls) >= 3:
            agent._hb_done.set()

    agent.heartbeat_once = beat
    agent.settings.heartbeat_s = 0.01
    thread = threading.Thread(target=agent._heartbeat_loop)
    thread.start()
    thread.join(timeout=10)
    assert len(calls) >= 3


def test_a_message_put_back_by_a_stopping_agent_keeps_its_priority(agent):
    jobs = agent.queue.jobs
    jobs.send(Dispatch(job="j-urgent", token=1, kind="train", priority=50).wire(), priority=50)
    jobs.send(Dispatch(job="j-later", token=1, kind="train", priority=10).wire(), priority=10)
    agent.queue.jobs = _Wrap(jobs, after_receive=lambda m: agent.stop.set("SIGTERM"))  # stopped just after taking
    assert agent.step() is False
    first, second = jobs.receive(timeout=0.5), jobs.receive(timeout=0.5)
    assert (first["job"], first["priority"], second["job"]) == ("j-urgent", 50, "j-later")


def test_nan_in_a_report_is_left_out_with_a_line_and_the_agent_goes_on(agent, orch, tmp_path, caplog):
    _register(orch, "n1")
    jid = _submit(orch, epochs=4)
    _take(orch, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00001.ckpt"
    with _serving(orch), caplog.at_level(logging.WARNING):
        progress = agent._reporter(jid, 1)({"type": "progress", "epochs_done": 1, "checkpoint": ck,
                                            "metrics": {"val_loss": math.nan, "val_iou": 0.25}})
        agent._finish(jid, 1, {"outcome": "handed_back", "epochs_done": 1, "checkpoint": ck,
                               "metrics": {"val_loss": math.inf}, "timings": {"train_s": math.nan, "fetch_s": 1.0},
                               "plan": {"norm": {"mean": math.nan}, "epochs": 4}})
    assert progress["ok"]
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.QUEUED and job.attempts[0].timings == {"fetch_s": 1.0}
    assert job.metrics == {"val_iou": 0.25} and job.plan == {"norm": {"mean": None}, "epochs": 4}
    lines = [r.getMessage() for r in caplog.records]
    assert any("metric val_loss is nan" in m for m in lines) and any("timing train_s is nan" in m for m in lines)
