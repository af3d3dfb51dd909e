"""The orchestrator's request handling: claims, fencing, hand-back, retries, cancel (simulated clock)."""

import pytest

from dlorch.core.settings import Settings
from dlorch.core.spec import AttemptOutcome, JobStatus
from dlorch.core.wire import Signer
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import NotLeader, Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def orch(tmp_path):
    clock = Clock()
    s = Settings(store=str(tmp_path), lease_s=10, max_attempts=2)
    o = Orchestrator(s, Ledger(LocalDirStateStore(tmp_path / "ledger")),
                     Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k")), clock=clock)
    o.lead()
    o.clock_ = clock
    return o


def _submit(o, **kw):
    spec = {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy", **kw}
    return o.handle({"type": "submit", "spec": spec})["job"]


def _register(o, node):
    o.handle({"type": "register", "node_info": {"id": node, "hostname": "h", "pid": 1, "cpus": 2,
                                                  "memory_bytes": 1, "gpus": [], "torch": "x"}})


def _take(o, node):
    msg = o.queue.jobs.receive(timeout=0.5)
    return msg, o.handle({"type": "claim", "job": msg["job"], "token": msg["token"], "node": node})


def test_claim_progress_finish(orch, tmp_path):
    _register(orch, "n1")
    jid = _submit(orch, epochs=4)
    msg, reply = _take(orch, "n1")
    assert reply["ok"] and msg == {"job": jid, "token": 1, "kind": "train"}
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00001.ckpt"
    assert orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                        "checkpoint": ck})["ok"]
    done = orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "succeeded",
                        "epochs_done": 4, "model": f"{tmp_path}/jobs/{jid}/attempts/1/model.ckpt"})
    assert done == {"ok": True, "status": "succeeded"}
    job = orch.ledger.get(jid)
    assert (job.status, job.epochs_done, job.checkpoint, job.node) == (JobStatus.SUCCEEDED, 4, ck, "n1")
    orch.handle({"type": "heartbeat", "node": "n1"})  # the node's own heartbeat says it is free again
    assert orch.ledger.node("n1").job is None and orch.ledger.node("n1").state == "idle"


def test_duplicate_message_is_idempotent(orch):
    jid = _submit(orch)
    orch._enqueue(orch.ledger.get(jid), orch.clock_())  # the queue now holds the same message twice
    _, first = _take(orch, "n1")
    _, second = _take(orch, "n2")
    assert first["ok"] and not second["ok"]
    assert len(orch.ledger.get(jid).attempts) == 1


def test_fencing_rejects_a_stale_attempt(orch, tmp_path):
    jid = _submit(orch, epochs=5)
    _take(orch, "old")
    orch.clock_.t += 11  # the old node stops heartbeating
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.QUEUED and job.attempts[0].outcome is AttemptOutcome.EXPIRED
    _, reply = _take(orch, "new")
    assert reply["ok"] and reply["job"]["next_token"] == 2
    stale = orch.handle({"type": "progress", "job": jid, "token": 1, "node": "old", "epochs_done": 3,
                         "checkpoint": f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00003.ckpt"})
    assert not stale["ok"] and "does not hold the lease" in stale["reason"]
    hb = orch.handle({"type": "heartbeat", "node": "old", "job": jid, "token": 1})
    assert hb["lease"] is False
    forged = orch.handle({"type": "finish", "job": jid, "token": 2, "node": "new", "outcome": "succeeded",
                          "output": f"{tmp_path}/jobs/{jid}/attempts/1/output.tif"})
    assert not forged["ok"] and "outside attempt 2" in forged["reason"]
    assert orch.ledger.get(jid).status is JobStatus.RUNNING


def test_handback_requeues_with_progress(orch, tmp_path):
    jid = _submit(orch, epochs=6)
    _take(orch, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00002.ckpt"
    orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "handed_back",
                 "epochs_done": 2, "checkpoint": ck})
    job = orch.ledger.get(jid)
    assert (job.status, job.epochs_done, job.next_token, job.checkpoint) == (JobStatus.QUEUED, 2, 2, ck)
    _, reply = _take(orch, "n2")
    assert reply["job"]["attempts"][-1]["resumed_from"] == ck
    assert reply["job"]["attempts"][-1]["epochs_start"] == 2


def test_errors_retry_then_fail(orch):
    jid = _submit(orch)
    for token in (1, 2):
        _take(orch, "n1")
        orch.handle({"type": "finish", "job": jid, "token": token, "node": "n1", "outcome": "errored",
                     "error": "RuntimeError: boom"})
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and "boom" in job.error
    assert orch.queue.jobs.size() == 0


def test_cancel_running_job_revokes_lease(orch):
    jid = _submit(orch)
    _take(orch, "n1")
    assert orch.handle({"type": "cancel", "job": jid})["ok"]
    assert orch.handle({"type": "heartbeat", "node": "n1", "job": jid, "token": 1})["lease"] is False
    assert not orch.handle({"type": "cancel", "job": jid})["ok"]


def test_second_orchestrator_is_refused(orch, tmp_path):
    other = Orchestrator(orch.settings, orch.ledger, orch.queue, clock=orch.clock_)
    with pytest.raises(NotLeader, match="already running"):
        other.lead()


def test_queue_rebuilt_from_ledger(orch):
    jid = _submit(orch)
    orch.queue.jobs.storage.flush_queue()  # the queue lost everything
    orch.clock_.t += 6
    orch.maintain(orch.clock_())
    assert orch.queue.jobs.receive(timeout=0.5)["job"] == jid


def test_lost_nodes_fail_a_job_only_after_their_own_limit(orch):
    orch.settings.max_node_losses = 4
    jid = _submit(orch)
    for _ in range(3):
        _take(orch, "n1")
        orch.clock_.t += 11
        orch.maintain(orch.clock_())
    assert orch.ledger.get(jid).status is JobStatus.QUEUED  # 3 losses > max_attempts (2), still going
    _take(orch, "n1")
    orch.clock_.t += 11
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and "4 nodes in a row" in job.error
