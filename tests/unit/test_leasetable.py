"""The in-memory lease table: renewals cost no write, flushes on change of hands, newest heartbeat wins."""

from dlorch.orchestrator.leasetable import LeaseTable

LEASE = 30.0


def table_with_lease(now: float = 100.0) -> LeaseTable:
    t = LeaseTable(lease_s=LEASE)
    t.hold("j-1", 1, "n1", now + LEASE)  # granted by a claim, written with it
    t.beat("n1", now, now, job="j-1", token=1)
    t.written(t.due(now))
    return t


def test_renewals_are_written_as_one_liveness_record_every_few_seconds():
    t = table_with_lease()
    writes, records = 0, 0
    for now in range(103, 161, 3):  # a heartbeat every 3 s for a minute
        t.beat("n1", float(now), float(now), job="j-1", token=1)
        t.caught_up(float(now))
        flush = t.due(float(now))
        writes += flush.live
        records += len(flush.jobs) + len(flush.nodes)
        t.written(flush, float(now))
        assert t.lapsed(float(now)) == []
    assert records == 0 and writes == 20  # nothing changed hands; every heartbeat came after two seconds
    assert t.live_record() == {"nodes": {"n1": 160.0}, "jobs": {"j-1": {"token": 1, "node": "n1", "expires_at": 190.0}}}
    assert not t.due(161.0).live  # nothing renewed since


def test_a_change_of_hands_is_flushed_at_once():
    t = table_with_lease()
    t.beat("n1", 101.0, 101.0)  # it left its job
    assert t.due(101.0).nodes == ["n1"]
    t.beat("n2", 101.0, 101.0)  # a new node
    t.hold("j-2", 1, "n2", 131.0, written=False)
    flush = t.due(101.1)  # within the second: only what changed hands
    assert flush.nodes == ["n1", "n2"] and flush.jobs == ["j-2"]
    t.written(flush)
    assert t.due(101.2).nodes == [] and t.due(101.2).jobs == []


def test_a_superseded_heartbeat_renews_and_changes_nothing():
    t = table_with_lease()
    assert t.beat("n1", 110.0, 110.0, job="j-1", token=1).renewed
    late = t.beat("n1", 105.0, 111.0)  # older than the one applied: it says the node left its job
    assert not late.applied
    assert t.nodes["n1"].job == "j-1" and t.jobs["j-1"].expires_at == 140.0


def test_a_lease_runs_from_the_send_time_not_from_when_a_backlog_was_read():
    t = table_with_lease()
    t.beat("n1", 101.0, 200.0, job="j-1", token=1)  # the node's last words, read 99 s later
    t.caught_up(200.0)
    assert [x.job_id for x in t.lapsed(200.0)] == ["j-1"]


def test_no_lease_lapses_while_a_backlog_holds_its_renewal():
    t = table_with_lease()
    t.caught_up(100.0)
    # An outage: the queue kept heartbeats from 103 to 190; the orchestrator reads them from 200 on.
    for i, sent in enumerate(range(103, 191, 3)):
        now = 200.0 + i * 0.01
        t.beat("n2", float(sent), now)  # other nodes' heartbeats, in order
        assert t.lapsed(now) == []  # n1's renewal from 190 is still queued behind them
        t.beat("n1", float(sent), now, job="j-1", token=1)
    t.caught_up(201.0)
    assert t.lapsed(201.0) == []  # judged by its newest heartbeat (190): lease until 220
    t.caught_up(221.0)
    assert [x.job_id for x in t.lapsed(221.0)] == ["j-1"]


def test_a_clock_ahead_extends_nothing_and_grace_holds_every_lease():
    t = table_with_lease()
    t.beat("n1", 1000.0, 101.0, job="j-1", token=1)
    assert t.jobs["j-1"].expires_at == 131.0
    t.caught_up(140.0)
    assert t.lapsed(140.0, grace_until=150.0) == []
    assert [x.node for x in t.lapsed(151.0, grace_until=150.0)] == ["n1"]


def test_a_heartbeat_for_another_attempt_renews_nothing():
    t = table_with_lease()
    assert t.beat("n2", 110.0, 110.0, job="j-1", token=1).renewed is False
    assert t.beat("n1", 110.0, 110.0, job="j-1", token=2).renewed is False
    assert t.jobs["j-1"].expires_at == 130.0
    t.release("j-1")
    assert t.beat("n1", 111.0, 111.0, job="j-1", token=1).renewed is False


def test_a_failed_flush_is_due_again():
    t = table_with_lease()
    t.beat("n1", 120.0, 120.0, job="j-1", token=1)
    t.beat("n2", 120.0, 120.0)
    first = t.due(120.0)
    assert first.live and first.nodes == ["n2"]  # never t.written(first): the write failed
    assert t.due(121.0) == first


def test_records_due_together_are_written_a_few_at_a_time_oldest_first():
    t = LeaseTable(lease_s=LEASE, urgent_per_pass=10, urgent_every_s=0.2)
    for i in range(100):  # a hundred agents that started together
        t.hold(f"j-{i}", 1, f"n{i:04d}", 130.0)
        t.beat(f"n{i:04d}", 100.0 + i / 1000, 100.0 + i / 1000, job=f"j-{i}", token=1)
    passes, now = [], 100.1
    while (flush := t.due(now)).nodes:
        assert len(flush.nodes) <= 10 and t.due(now + 0.1).nodes == flush.nodes  # none more before it is written
        passes.append(flush)
        t.written(flush, now)
        assert t.due(now + 0.1).nodes == []  # the next ones a fifth of a second later
        now += 0.2
    assert len(passes) == 10 and passes[0].nodes[0] == "n0000"  # all within two seconds, oldest first
    assert passes[0].live and not any(p.live for p in passes[1:])  # renewals: one record, now and then
