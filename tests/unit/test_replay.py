"""Forged, replayed and junk requests change nothing and crash nothing: the real orchestrator on a SQLite queue.

A recorder on the queue copies a signed request as it passes (``_send`` returns its bytes) and puts it back
later; the orchestrator's clock is simulated, the senders stamp their requests with it.
"""

import threading
import time
import uuid
from pathlib import Path

import pytest

from dlorch.core.protocol import FRESH_S
from dlorch.core.spec import AttemptOutcome, JobStatus
from dlorch.core.wire import Signer
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import Orchestrator
from tests.unit.test_orchestrator import _register, _submit, _take


def _queue(o, sender: str, key: bytes = b"k") -> Queue:
    return Queue(o.queue.url, Signer(key), sender=sender)


def _send(o, q: Queue, body: dict) -> tuple[str, bytes]:
    """Send ``body`` as ``q``'s sender does, let the orchestrator take it; returns (request id, recorded bytes)."""
    q.offset = o.clock_() - time.monotonic()  # the sender knows the orchestrator's clock (learnt from replies)
    rid = uuid.uuid4().hex
    q.events.send(q.stamp(body, rid))
    (recorded,) = q.events.storage.enqueued_items()
    o.step(timeout=0.5)
    return rid, recorded


def _replay(o, q: Queue, recorded: bytes) -> None:
    q.events.storage.enqueue(recorded, 0)
    o.step(timeout=0.5)


def _records(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "ledger"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.json") if p.name != "leader.json"}


def test_a_replayed_progress_report_never_sets_epochs_back(orch, tmp_path):
    jid = _submit(orch, epochs=6)
    _take(orch, "n1")
    q = _queue(orch, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-0000%d.ckpt"
    _, first = _send(orch, q, {"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                               "checkpoint": ck % 1})
    _send(orch, q, {"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 2, "checkpoint": ck % 2})
    orch.clock_.t += 3
    _replay(orch, q, first)  # a duplicate: not applied again
    assert (orch.ledger.get(jid).epochs_done, orch.ledger.get(jid).checkpoint) == (2, ck % 2)
    # The orchestrator restarts (its memory of request ids is gone) and the recording is played again later.
    orch.clock_.t += FRESH_S + 1
    fresh = Orchestrator(orch.settings, orch.ledger, orch.queue, clock=orch.clock_)
    fresh.ledger.release_leadership(orch.me)
    fresh.lead()
    fresh.clock_ = orch.clock_
    _replay(fresh, q, first)  # stale
    # Even a new request (a fresh id and time) saying less than what is recorded is no step back.
    late = fresh.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                         "checkpoint": ck % 1})
    job = fresh.ledger.get(jid)
    assert late["ok"] and (job.epochs_done, job.checkpoint, job.status) == (2, ck % 2, JobStatus.RUNNING)


def _running_at(o, tmp_path, epochs: int) -> tuple[str, str]:
    """A job running on n1 (attempt 1) that checkpointed ``epochs`` epochs: its id and that checkpoint."""
    jid = _submit(o, epochs=6)
    _take(o, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-{epochs:05d}.ckpt"
    assert o.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": epochs,
                     "checkpoint": ck})["ok"]
    return jid, ck


def test_a_fall_back_report_after_progress_is_refused(orch, tmp_path):
    jid, ck = _running_at(orch, tmp_path, 2)
    back = orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 0,
                        "resumed_from": "", "why": "no readable checkpoint"})
    assert not back["ok"] and "made progress already" in back["reason"]
    assert (orch.ledger.get(jid).epochs_done, orch.ledger.get(jid).checkpoint) == (2, ck)


def test_a_replayed_heartbeat_does_not_keep_a_dead_nodes_job(orch):
    _register(orch, "n1")
    jid = _submit(orch)
    _take(orch, "n1")  # lease until 1010
    q = _queue(orch, "n1")
    orch.clock_.t += 5
    _, beat = _send(orch, q, {"type": "heartbeat", "node": "n1", "job": jid, "token": 1})  # lease until 1015
    # The node dies. Someone who recorded its heartbeat plays it back to keep the job "alive".
    for _ in range(3):
        orch.clock_.t += 3
        _replay(orch, q, beat)
    assert orch.leasetable.jobs[jid].expires_at == orch.ledger.liveness()["jobs"][jid]["expires_at"] == 1015
    orch.clock_.t += 2  # now 1016: past the lease
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.QUEUED and job.attempts[0].outcome is AttemptOutcome.EXPIRED


def test_a_node_registering_again_is_not_drained_and_a_replayed_drain_does_not_drain_it(orch):
    _register(orch, "n1")
    client = _queue(orch, "client-0001")
    _, drain = _send(orch, client, {"type": "drain", "node": "n1"})
    assert orch.handle({"type": "heartbeat", "node": "n1"})["drain"] is True
    _register(orch, "n1")  # a new agent started with the same --node-id
    assert orch.handle({"type": "heartbeat", "node": "n1"})["drain"] is False
    orch.clock_.t += 2
    _replay(orch, client, drain)
    assert orch.handle({"type": "heartbeat", "node": "n1"})["drain"] is False
    assert orch.ledger.node("n1").state != "draining"


def test_a_message_recorded_on_one_channel_is_refused_on_the_other(orch):
    jid = _submit(orch)
    _register(orch, "n1")
    dispatch = orch.queue.jobs.storage.enqueued_items()[0]
    q = _queue(orch, "n1")
    q.events.send(q.stamp({"type": "claim", "job": jid, "token": 1, "node": "n1"}, uuid.uuid4().hex))
    (claim,) = q.events.storage.enqueued_items()
    q.events.storage.flush_queue()
    orch.queue.jobs.storage.enqueue(claim, 0)  # an agent would take a claim for a dispatch
    orch.queue.events.storage.enqueue(dispatch, 0)
    orch.step(timeout=0.2)
    assert [m["job"] for m in orch.queue.jobs.items()] == [jid]  # the claim was dropped, the dispatch kept
    assert orch.queue.events.rejected == 1 and orch.ledger.get(jid).status is JobStatus.QUEUED


def test_a_node_request_sent_by_another_node_is_refused(orch, tmp_path):
    jid = _submit(orch)
    _take(orch, "n1")
    other = _queue(orch, "n2")
    rid, _ = _send(orch, other, {"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "errored",
                                 "error": "lies"})
    reply = other.events.take_reply(rid)
    assert not reply["ok"] and "sent by n2" in reply["reason"]
    assert orch.ledger.get(jid).status is JobStatus.RUNNING


@pytest.mark.parametrize("junk", [
    b"\x00\xff binary",
    b'{"type":"heartbeat","node":"n1"}',  # unsigned
    Signer(b"wrong").seal({"type": "finish", "job": "J", "token": 1, "node": "n1", "outcome": "succeeded",
                           "rid": "a" * 32, "sender": "n1", "sent_at": 1000.0, "ch": "events"}),
    Signer(b"k").seal({"type": "progress", "job": "J", "token": [1], "node": "n1", "rid": "b" * 32, "sender": "n1",
                       "sent_at": 1000.0, "ch": "events"}),  # signed, but not a request
    Signer(b"k").seal({"type": "heartbeat", "node": "n1", "ch": "events"}),  # no envelope
    Signer(b"k").seal({"type": "cancel", "job": "J", "rid": "c" * 32, "sender": "../x", "sent_at": 1e308,
                       "ch": "events"}),
])
def test_forged_and_junk_requests_change_nothing_and_crash_nothing(orch, tmp_path, junk):
    jid = _submit(orch)
    _register(orch, "n1")
    _take(orch, "n1")
    orch.step(timeout=0)
    before = _records(tmp_path)
    orch.queue.events.storage.enqueue(junk.replace(b'"J"', f'"{jid}"'.encode()), 0)
    orch.step(timeout=0.5)
    assert _records(tmp_path) == before
    assert orch.handle({"type": "heartbeat", "node": "n1", "job": jid, "token": 1})["lease"] is True


def test_a_sender_whose_clock_is_an_hour_ahead_is_answered_after_one_round(orch):
    _register(orch, "n1")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            orch.step(timeout=0.05)

    q = _queue(orch, "n1")
    q.offset += 3600 + 1000 - time.time()  # the orchestrator's clock reads 1000; this node's wall clock + 1 h
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        reply = q.request({"type": "heartbeat", "node": "n1"}, timeout=10)
    finally:
        stop.set()
        thread.join()
    assert reply["ok"] and reply["register"] is False
    assert abs(time.monotonic() + q.offset - orch.clock_()) < 5  # it now stamps in the orchestrator's clock


def test_an_artifact_is_owned_by_its_attempts_keys_in_this_store_only(orch, tmp_path):
    jid = _submit(orch, epochs=4)
    _take(orch, "n1")
    other = _submit(orch)
    mine = f"{tmp_path}/jobs/{jid}/attempts/1"
    for uri in (f"s3://evil/jobs/{jid}/attempts/1/x.ckpt", f"{mine}/../../{other}/x.ckpt",
                f"/elsewhere{mine}/x.ckpt", f"{mine}0/x.ckpt", f"file://{mine}/x.ckpt", f"{mine}/x.ckpt?v=2"):
        got = orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                           "checkpoint": uri})
        assert not got["ok"] and "outside attempt 1" in got["reason"], uri
        got = orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "succeeded",
                           "model": uri})
        assert not got["ok"] and "outside attempt 1" in got["reason"], uri
    job = orch.ledger.get(jid)
    assert (job.status, job.checkpoint, job.model) == (JobStatus.RUNNING, None, None)
    assert orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                        "checkpoint": f"{mine}/ckpt/epoch-00001.ckpt"})["ok"]


def test_a_finish_reporting_fewer_epochs_than_its_checkpoints_keeps_the_resume_point(orch, tmp_path):
    jid, ck = _running_at(orch, tmp_path, 3)
    assert orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "handed_back",
                        "epochs_done": 1, "checkpoint": ck})["ok"]
    job = orch.ledger.get(jid)
    assert (job.status, job.epochs_done, job.checkpoint) == (JobStatus.QUEUED, 3, ck)


def test_a_claim_sent_again_after_its_kept_reply_was_forgotten_is_not_applied_twice(orch, tmp_path):
    orch.guard.reply_capacity = 2  # replies kept for duplicates: the oldest are forgotten beyond this
    _register(orch, "n1")
    jid = _submit(orch)
    q = _queue(orch, "n1")
    rid, _ = _send(orch, q, {"type": "claim", "job": jid, "token": 1, "node": "n1"})
    assert q.events.take_reply(rid)["ok"]
    for i in range(3):  # other requests: the claim's kept reply is forgotten
        _send(orch, _queue(orch, f"n{i + 2}"), {"type": "heartbeat", "node": f"n{i + 2}"})
    before = _records(tmp_path)
    q.events.send(q.stamp({"type": "claim", "job": jid, "token": 1, "node": "n1"}, rid))  # its sender, again
    orch.step(timeout=0.5)
    assert _records(tmp_path) == before and q.events.take_reply(rid) is None  # a duplicate: not applied again
    assert orch.ledger.get(jid).status is JobStatus.RUNNING and len(orch.ledger.get(jid).attempts) == 1
