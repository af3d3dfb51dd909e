"""Heartbeats renew leases in memory; the ledger gets a record on change of hands, renewals in one liveness record;
a backlog of heartbeats after an outage expires no live lease (the real orchestrator on a SQLite queue)."""

import time
import uuid
from pathlib import Path

from dlorch.core.spec import AttemptOutcome, JobStatus
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore
from tests.unit.test_orchestrator import _register, _submit, _take
from tests.unit.test_replay import _queue


def _queued(o, q, body: dict, sent_at: float) -> None:
    """Put ``body`` in the queue as ``q``'s sender stamps it at ``sent_at`` (orchestrator clock)."""
    q.offset = sent_at - time.monotonic()
    q.events.send(q.stamp(body, uuid.uuid4().hex))


def _ledger_bytes(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "ledger"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.json")
            if p.name not in ("leader.json", "liveness.json")}


def test_heartbeats_write_no_job_or_node_record_only_the_liveness_record_now_and_then(orch, tmp_path):
    _register(orch, "n1")
    jid = _submit(orch)
    _take(orch, "n1")  # lease 10 s: until 1010
    q = _queue(orch, "n1")
    beat = {"type": "heartbeat", "node": "n1", "job": jid, "token": 1}
    _queued(orch, q, beat, orch.clock_())
    orch.step(timeout=0.5)  # the node took a job: its record is written at once
    before = _ledger_bytes(tmp_path)
    lives = []
    for _ in range(6):  # a heartbeat a second, each renewing the lease in memory
        orch.clock_.t += 1
        _queued(orch, q, beat, orch.clock_())
        orch.step(timeout=0.5)
        orch.maintain(orch.clock_())
        lives.append(orch.ledger.liveness()["jobs"][jid]["expires_at"])
    assert _ledger_bytes(tmp_path) == before  # no job record, no node record
    assert orch.leasetable.jobs[jid].expires_at == 1016
    assert lives == [1010, 1012, 1012, 1014, 1014, 1016]  # the liveness record: every two seconds
    assert orch.ledger.get(jid).current.lease_expires_at == 1010  # the job record: as the claim wrote it
    assert orch.ledger.node("n1").heartbeat_at == 1000 and orch.ledger.nodes()[0].heartbeat_at == 1006


def test_a_new_orchestrator_takes_the_leases_renewed_in_the_liveness_record(orch, tmp_path):
    _register(orch, "n1")
    jid = _submit(orch)
    _take(orch, "n1")
    for _ in range(7):
        orch.clock_.t += 1
        orch.handle({"type": "heartbeat", "node": "n1", "job": jid, "token": 1})
    assert orch.ledger.liveness()["jobs"][jid]["expires_at"] == 1017
    later = Orchestrator(orch.settings, Ledger(LocalDirStateStore(tmp_path / "ledger")), orch.queue, clock=orch.clock_)
    later.ledger.release_leadership(orch.me)
    later.lead()
    later.maintain(orch.clock_())
    assert later.leasetable.jobs[jid].expires_at == 1017  # the job record says 1010


def test_a_backlog_after_an_outage_expires_no_live_lease(orch):
    _register(orch, "n1")
    _register(orch, "n2")
    jid = _submit(orch)
    _take(orch, "n1")  # lease until 1010
    q1, q2 = _queue(orch, "n1"), _queue(orch, "n2")
    # The orchestrator could not read the queue from 1000 to 1015; the nodes kept heartbeating into it.
    for t in range(1000, 1015, 3):
        _queued(orch, q2, {"type": "heartbeat", "node": "n2"}, t)
        _queued(orch, q1, {"type": "heartbeat", "node": "n1", "job": jid, "token": 1}, t)
    orch.clock_.t = 1015
    orch.maintain(orch.clock_())  # n1's renewals wait unread in the queue: its lease stands
    while orch.step(timeout=0.1, max_events=1):
        orch.maintain(orch.clock_())  # judged along the backlog, never ahead of what was read
    assert orch.ledger.get(jid).status is JobStatus.RUNNING
    orch.clock_.t = 1023  # n1's newest heartbeat (1012) is 11 s old: its lease ended
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.QUEUED and job.attempts[0].outcome is AttemptOutcome.EXPIRED
