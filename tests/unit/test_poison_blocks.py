"""A block that kills every node it is handed to fails its job, named, after a limit (simulated clock)."""

from dlorch.core.spec import JobStatus
from dlorch.orchestrator.blockbook import BlockBook
from tests.unit.test_orchestrator import _register, _split

LEASE = 10.0


def test_a_block_lost_max_losses_times_fails_the_book_named():
    b = BlockBook("j1", "m1", 3, [100] * 3, max_errors=3, max_losses=3)
    t = 0.0
    for n in range(3):
        assert b.pick(f"node-{n}", t, LEASE) == 0  # the lowest waiting block: the poison one, again
        t += LEASE + 1
        assert b.expire(t) == [0]
    assert b.failed and b.failed.startswith("block 0:") and "3 nodes were lost" in b.failed
    assert "node-2" in b.failed
    assert b.pick("node-9", t, LEASE) is None  # nothing more is handed out


def test_losses_below_the_limit_and_released_blocks_do_not_fail_it():
    b = BlockBook("j1", "m1", 2, [100] * 2, max_errors=3, max_losses=3)
    assert b.pick("a", 0.0, LEASE) == 0
    b.expire(20.0)
    assert b.pick("b", 20.0, LEASE) == 0
    b.release("b", 0)  # a node that stops hands its block back: not a loss
    assert b.pick("c", 21.0, LEASE) == 0 and b.finish("c", 0, {})
    assert not b.failed and b.losses == {0: 1}


def test_losses_survive_an_orchestrator_restart():
    b = BlockBook("j1", "m1", 2, [100] * 2, max_errors=3, max_losses=2)
    b.pick("a", 0.0, LEASE)
    b.expire(20.0)
    again = BlockBook.restore("j1", "m1", [100] * 2, b.summary(), 3, max_losses=2)
    assert again.losses == {0: 1}
    again.pick("b", 30.0, LEASE)
    again.expire(50.0)
    assert again.failed and again.failed.startswith("block 0:")


def test_the_orchestrator_fails_the_job_naming_the_poison_block(orch):
    orch.settings.max_node_losses = 2
    for n in ("n1", "n2", "n3"):
        _register(orch, n)
    jid = _split(orch, "n1", 3)
    for node in ("n2", "n3"):  # each node takes block 0 and dies with it
        got = orch.handle({"type": "next_block", "node": node, "job": jid})
        assert got["block"]["index"] == 0
        orch.clock_.t += 30
        orch.maintain(orch.clock_())
    orch.clock_.t += 2
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and job.error.startswith("block 0:")
    assert job.blocks["losses"] == {"0": 2}
    assert orch.handle({"type": "next_block", "node": "n1", "job": jid}) == {"ok": True, "block": None}
