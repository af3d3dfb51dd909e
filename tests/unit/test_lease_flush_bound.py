"""On a slow ledger (S3: tens of milliseconds a request) no request or maintenance pass waits on a burst of
writes or reads: renewals of every lease go out as one liveness record, records that changed hands a few at
a time, and the rescan of active jobs over several passes (a slow store injected at the seam)."""

import time
import uuid

import pytest

from dlorch.core.spec import JobStatus
from dlorch.orchestrator.statestore import LocalDirStateStore
from tests.unit.conftest import leading_orchestrator
from tests.unit.test_orchestrator import _register, _submit, _take


class SlowStore(LocalDirStateStore):
    """The local ledger, counting its requests, each taking ``delay_s`` once ``slow`` is set (as S3 does)."""

    def __init__(self, root, delay_s: float = 0.02) -> None:
        super().__init__(root)
        self.delay_s, self.slow, self.gets, self.puts = delay_s, False, 0, 0

    def get(self, key):
        self.gets += 1
        if self.slow:
            time.sleep(self.delay_s)
        return super().get(key)

    def put(self, key, data, **kw):
        self.puts += 1
        if self.slow:
            time.sleep(self.delay_s)
        return super().put(key, data, **kw)


@pytest.fixture
def slow(tmp_path):
    return leading_orchestrator(tmp_path, SlowStore(tmp_path / "ledger"))


def _running(o, n: int) -> list[tuple[str, str]]:
    """``n`` nodes each holding a job, their first heartbeats applied and flushed (the store still fast)."""
    held = []
    for i in range(n):
        _register(o, f"n{i:03d}")
        _submit(o)
    for i in range(n):
        msg, reply = _take(o, f"n{i:03d}")
        assert reply["ok"]
        held.append((f"n{i:03d}", msg["job"]))
    for node, jid in held:
        o.handle({"type": "heartbeat", "node": node, "job": jid, "token": 1})
    _flush_all(o)  # the nodes that took a job, written
    return held


def _flush_all(o) -> int:
    """Flush passes a quarter second apart until every node record that changed hands is written; how many."""
    passes = 0
    while o.leasetable.unwritten():
        o.clock_.t += 0.25
        o.flush_leases(o.clock_())
        passes += 1
    return passes


def test_renewals_of_every_lease_cost_one_write_however_many_agents_heartbeat(slow):
    held = _running(slow, 40)
    store = slow.store_
    store.slow, puts, worst = True, store.puts, 0
    for _ in range(12):  # agents that started together heartbeat every second for more than a lease
        slow.clock_.t += 1
        for node, jid in held:
            before = store.puts
            assert slow.handle({"type": "heartbeat", "node": node, "job": jid, "token": 1})["lease"] is True
            worst = max(worst, store.puts - before)
    assert worst <= 2  # was: 80 records (each node's and its lease) written within one request
    assert store.puts - puts <= 8  # one liveness record every two seconds
    slow.clock_.t += 2
    slow.flush_leases(slow.clock_())  # the liveness record, again once renewals came in since
    live, now = slow.ledger.liveness(), slow.clock_()
    assert sorted(live["jobs"][jid]["expires_at"] for _, jid in held) == [now - 2 + 10] * len(held)
    assert {n.id: n.heartbeat_at for n in slow.ledger.nodes()}["n039"] == now - 2  # the newer copy wins


def test_records_that_changed_hands_are_written_a_few_per_pass_within_a_time_budget(slow):
    held = _running(slow, 30)
    store = slow.store_
    store.slow = True  # every agent leaves its job at once: 30 node records change hands
    worst = 0
    for node, _ in held:
        before = store.puts
        slow.handle({"type": "heartbeat", "node": node})
        worst = max(worst, store.puts - before)
    assert worst <= 4  # 50 ms of 20 ms writes (a node record is read, then written)
    assert _flush_all(slow) >= 5  # a few at a time
    assert {n.id: n.job for n in slow.ledger.nodes()} == {node: None for node, _ in held}  # each written in time


def test_the_rescan_of_active_jobs_reads_a_few_records_per_maintenance_pass(slow):
    jobs = [_submit(slow) for _ in range(40)]
    slow.maintain(slow.clock_())  # the first scan, on a fast store
    slow.store_.slow = True
    slow._next_rescan = 0.0  # a rescan is due
    passes = 0
    while True:
        gets = slow.store_.gets
        slow.maintain(slow.clock_())
        passes += 1
        assert slow.store_.gets - gets <= 10  # 0.1 s of 20 ms reads, and the leader record; was: 40 and more
        if slow._rescan is None:
            break
    assert passes >= 4 and set(slow.active) == set(jobs)


def test_a_job_written_during_a_rescan_keeps_the_orchestrators_copy(slow):
    jobs = [_submit(slow) for _ in range(20)]
    slow.maintain(slow.clock_())
    slow.store_.slow = True
    slow._next_rescan = 0.0
    slow.maintain(slow.clock_())  # the scan read a few records, among them the first job, still QUEUED
    assert slow._rescan is not None and slow._rescan.read[0].status is JobStatus.QUEUED
    first = slow._rescan.read[0].id
    slow.handle({"type": "cancel", "job": first})  # written meanwhile
    while slow._rescan is not None:
        slow.maintain(slow.clock_())
    assert first not in slow.active and len(slow.active) == len(jobs) - 1


def test_heartbeats_are_answered_ahead_of_a_backlog_of_requests_and_their_re_sent_copies(orch):
    from tests.unit.test_replay import _queue

    orch.READ_AHEAD = 4  # requests held in memory; beyond, their senders' copies bring them back
    _register(orch, "n0")
    orch.step(timeout=0.0)  # the first maintenance, done
    beat = _queue(orch, "n0")
    beat.offset = orch.clock_() - time.monotonic()
    asks = []
    for i in range(6):  # registrations, each re-sent twice while the first waits
        q = _queue(orch, f"n{i + 1}")
        q.offset = orch.clock_() - time.monotonic()
        body = {"type": "register", "node_info": {"id": f"n{i + 1}", "hostname": "h", "pid": 1, "cpus": 2,
                                                  "memory_bytes": 1, "gpus": [], "torch": "x"}}
        rid = uuid.uuid4().hex
        for _ in range(3):
            q.events.send(q.stamp(body, rid))
        asks.append((q, rid))
    beat.events.send(beat.stamp({"type": "heartbeat", "node": "n0"}, "b" * 32))  # behind 18 requests
    orch.REQUESTS_BUDGET_S = 0.0  # one other request a step
    orch.step(timeout=0.5)
    assert beat.events.take_reply("b" * 32)["ok"]  # answered in the first step
    assert len(orch._read) == 3  # 4 read, one of them handled; each copy in its first's place
    while orch.step(timeout=0.1):
        pass
    answered = [q.events.take_reply(rid) for q, rid in asks]
    assert [bool(a and a["ok"]) for a in answered] == [True] * 4 + [False] * 2  # the last two: sent again later


def test_a_request_that_waited_past_the_freshness_window_is_handled_as_its_newest_copy(orch):
    from dlorch.core.protocol import FRESH_S
    from tests.unit.test_replay import _queue

    orch.step(timeout=0.0)
    q = _queue(orch, "n1")
    body = {"type": "register", "node_info": {"id": "n1", "hostname": "h", "pid": 1, "cpus": 2, "memory_bytes": 1,
                                              "gpus": [], "torch": "x"}}
    rid = uuid.uuid4().hex
    q.offset = orch.clock_() - FRESH_S - 60 - time.monotonic()
    q.events.send(q.stamp(body, rid))  # sent three minutes ago, still waiting behind a backlog
    q.offset = orch.clock_() - time.monotonic()
    q.events.send(q.stamp(body, rid))  # its sender's copy, sent again meanwhile
    orch.step(timeout=0.5)
    assert q.events.take_reply(rid)["ok"] and q.events.take_reply(rid) is None  # handled once, not refused as stale
