"""Block leases in memory (pure policy, simulated clock): hand-out, expiry, errors, affinity, restore."""

from dlorch.orchestrator.blockbook import BlockBook, choose_book, from_ranges, to_ranges

LEASE = 10.0


def book(n=6, job="j1", model="m1", **kw) -> BlockBook:
    return BlockBook(job, model, n, [100] * n, max_errors=3, **kw)


def test_ranges_round_trip():
    done = {0, 1, 2, 5, 7, 8}
    assert to_ranges(done) == [[0, 3], [5, 6], [7, 9]]
    assert from_ranges(to_ranges(done)) == done
    assert to_ranges(set()) == [] and from_ranges(None) == set()


def test_each_block_is_leased_to_one_node_at_a_time_and_expires_back():
    b = book(3)
    assert [b.pick("a", 0.0, LEASE), b.pick("b", 0.0, LEASE), b.pick("a", 0.0, LEASE)] == [0, 1, 2]
    assert b.pick("c", 1.0, LEASE) is None  # all held
    assert b.renew("a", 0, 8.0, LEASE)  # a heartbeat keeps block 0
    assert not b.renew("c", 1, 8.0, LEASE)  # a node cannot renew another's live lease
    assert b.expire(12.0) == [1, 2]  # b and a's block 2 went silent
    assert sorted(b.waiting(12.0)) == [1, 2]
    assert b.pick("c", 12.0, LEASE) == 1


def test_done_counts_once_even_when_a_late_node_reports_a_rerun_block():
    b = book(2)
    b.pick("a", 0.0, LEASE)
    b.expire(20.0)
    assert b.pick("b", 20.0, LEASE) == 0
    assert b.finish("b", 0, {"compute_s": 1.0})
    assert not b.finish("a", 0, {"compute_s": 1.0})  # the stale holder's report: same bytes, counted once
    assert b.by_node == {"b": 1} and b.voxels_done == 100 and b.timings == {"compute_s": 1.0}
    assert b.pick("a", 21.0, LEASE) == 1 and b.finish("a", 1, {})
    assert b.complete and b.pick("a", 22.0, LEASE) is None


def test_locality_prefers_the_block_after_the_last_one():
    b = book(6)
    assert b.pick("a", 0.0, LEASE, near=3) == 4
    assert b.pick("b", 0.0, LEASE, near=3) == 0  # 4 is taken: the lowest free one
    assert b.pick("a", 0.0, LEASE, near=5) == 1  # no block after the last: the lowest free one


def test_a_block_fails_the_job_after_max_errors_and_a_permanent_error_at_once():
    b = book(3)
    for t in range(2):
        assert b.pick("a", t, LEASE) == 0
        assert not b.error("a", 0, "bad chunk", permanent=False)
    assert b.pick("a", 3.0, LEASE) == 0
    assert b.error("a", 0, "bad chunk", permanent=False)
    assert b.failed == "block 0: bad chunk" and b.pick("a", 4.0, LEASE) is None
    p = book(3)
    p.pick("a", 0.0, LEASE)
    assert p.error("a", 0, "no such model", permanent=True) and p.failed.startswith("block 0")


def test_release_frees_a_block_at_once():
    b = book(2)
    b.pick("a", 0.0, LEASE)
    b.pick("a", 0.0, LEASE)
    b.release("b", 0)  # not b's to release
    assert b.waiting(1.0) == []
    b.release("a", 0)
    assert b.waiting(1.0) == [0] and b.pick("b", 1.0, LEASE) == 0


def test_summary_restores_done_blocks_but_not_leases():
    b = book(5)
    for i in range(4):
        b.pick("a", 0.0, LEASE)
    b.finish("a", 0, {"compute_s": 2.0})
    b.finish("a", 2, {"compute_s": 2.0})
    b.error("a", 3, "flaky", permanent=False)
    r = BlockBook.restore("j1", "m1", [100] * 5, b.summary(), max_errors=3)
    assert r.done == {0, 2} and r.errors == {3: 1} and r.by_node == {"a": 2} and r.voxels_done == 200
    assert sorted(r.waiting(0.0)) == [1, 3, 4]  # block 1's holder re-adopts it by heartbeat, or it runs again
    assert r.renew("a", 1, 0.0, LEASE) and r.waiting(0.0) == [3, 4]


def test_choose_book_priority_then_affinity_then_fifo():
    old = book(2, job="old", model="m1", created_at=1.0)
    new = book(2, job="new", model="m2", created_at=2.0)
    urgent = book(2, job="urgent", model="m3", priority=5, created_at=3.0)
    assert choose_book([old, new], set(), 0.0) is old  # FIFO
    assert choose_book([old, new], {"m2"}, 0.0) is new  # a model the node holds: no download
    assert choose_book([old, new, urgent], {"m2"}, 0.0) is urgent  # priority first
    for i in range(2):
        urgent.pick("x", 0.0, LEASE)
    assert choose_book([old, new, urgent], set(), 0.0) is old  # nothing left to hand out of urgent
    assert choose_book([], set(), 0.0) is None


class CountingSet(set):
    """A done set that counts the membership tests made of it."""

    looked = 0

    def __contains__(self, item):
        CountingSet.looked += 1
        return super().__contains__(item)


def test_whether_a_block_waits_is_known_without_walking_the_blocks_done():
    b = book(2_000)
    b.pick("slow", 0.0, LEASE)  # block 0 held long: the scan hint stays behind it
    last = b.pick("a", 0.0, LEASE)
    for _ in range(1_000):  # a node taking its blocks in order (locality)
        b.finish("a", last, {})
        last = b.pick("a", 1.0, LEASE, near=last)
    b.done = CountingSet(b.done)
    assert choose_book([b], set(), 1.0) is b  # every block request asks
    assert CountingSet.looked <= len(b.leases)  # was: every block done since the hint (1,000), on every request
    for i in range(b.total):
        if b.pick("a", 2.0, LEASE) is None:
            break
    assert not b.has_waiting(2.0) and b.has_waiting(2.0 + LEASE + 1)  # all held; then their leases ran out
