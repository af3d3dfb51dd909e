"""What a request costs the orchestrator at scale: ledger requests per agent that joins, and block requests
that do not look at every active job.

On S3 each ledger request takes tens of milliseconds (a hundred and more on a busy machine): at eleven or
twelve requests per agent, two thousand agents joining kept the orchestrator busy for over forty minutes.
"""

import pytest

from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore
from tests.unit.conftest import leading_orchestrator
from tests.unit.test_orchestrator import _register, _split, _submit, _take


class CountingStore(LocalDirStateStore):
    """The local ledger, counting the requests made of it by kind and key."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []
        self._in_put = False  # the local store checks a put's condition by reading: not a request of its own

    def get(self, key):
        if not self._in_put:
            self.calls.append(("get", key))
        return super().get(key)

    def put(self, key, data, **kw):
        self.calls.append(("put", key))
        self._in_put = True
        try:
            return super().put(key, data, **kw)
        finally:
            self._in_put = False


@pytest.fixture
def counted(tmp_path):
    return leading_orchestrator(tmp_path, CountingStore(tmp_path / "ledger"))


def test_an_agent_that_joins_costs_the_ledger_five_writes_and_no_read(counted):
    """Submit (the active marker, the job), register, claim, and the node record once it holds its job."""
    counted.maintain(counted.clock_())  # the first maintenance: leadership, the first scan
    store, n = counted.store_, 20
    store.calls.clear()
    for i in range(n):
        _submit(counted)
        _register(counted, f"n{i:02d}")
    for i in range(n):
        msg, reply = _take(counted, f"n{i:02d}")
        assert reply["ok"]
        counted.handle({"type": "heartbeat", "node": f"n{i:02d}", "job": msg["job"], "token": msg["token"]})
    while counted.leasetable.unwritten():  # the node records that changed hands, a few per flush
        counted.clock_.t += 0.25
        counted.flush_leases(counted.clock_())
    joined = [c for c in store.calls if not c[1].startswith("liveness")]  # one record for all (amortised)
    assert [c for c in joined if c[0] == "get"] == []  # was: 6 reads per agent
    assert len(joined) == 5 * n  # was: 12 requests per agent
    assert all(counted.ledger.get(j).current.node for j in counted.active)  # each claim is in the ledger


def test_a_claim_sent_again_to_a_restarted_orchestrator_is_recognised_from_the_ledger(counted):
    _register(counted, "n1")
    _submit(counted)
    msg, reply = _take(counted, "n1")
    fresh = Orchestrator(counted.settings, Ledger(counted.store_), counted.queue, clock=counted.clock_)
    fresh.ledger.release_leadership(counted.me)
    fresh.lead()  # nothing in memory: the claim's record is read once its write is refused
    again = fresh.handle({"type": "claim", "job": msg["job"], "token": msg["token"], "node": "n1"})
    assert again["ok"] and again["lease_expires_at"] == reply["lease_expires_at"]
    assert not fresh.handle({"type": "claim", "job": msg["job"], "token": msg["token"], "node": "n2"})["ok"]


def test_a_re_sent_submit_of_an_existing_job_changes_nothing(counted):
    spec = {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy"}
    first = counted.handle({"type": "submit", "spec": spec, "job_id": "j-same"})
    job = counted.ledger.get("j-same")
    again = counted.handle({"type": "submit", "spec": {**spec, "epochs": 7}, "job_id": "j-same"})
    assert first == again == {"ok": True, "job": "j-same"}
    assert counted.ledger.get("j-same") == job and counted.queue.jobs.size() == 1


class CountingValues(dict):
    """A dict of active jobs that counts how often all of them are looked at."""

    looked = 0

    def values(self):
        CountingValues.looked += 1
        return super().values()


def test_block_requests_do_not_look_at_every_active_job(counted):
    _register(counted, "n1")
    jid = _split(counted, "n1", 60)
    for _ in range(30):
        _submit(counted, priority=-1)  # queued behind the blockwise job
    counted.active = CountingValues(counted.active)
    last = None
    for _ in range(50):
        got = counted.handle({"type": "next_block", "node": "n1", "job": jid, "after": last,
                              "done": [{"job": jid, "block": last}] if last is not None else []})
        last = got["block"]["index"]
    assert CountingValues.looked <= 1  # was: every request, at 2,000 agents more than the block itself costs
    urgent = _submit(counted, priority=5)  # a job written: looked at again
    assert counted.handle({"type": "next_block", "node": "n1", "job": jid})["block"] is None
    assert counted.ledger.get(urgent).status.value == "queued"
