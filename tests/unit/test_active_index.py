"""The orchestrator's periodic scan reads the jobs that may still run, and no ended job's record."""

import json

from dlorch.core.settings import Settings
from dlorch.core.spec import Job, JobStatus, parse_spec
from dlorch.core.wire import Signer
from dlorch.orchestrator.ledger import ACTIVE_INDEXED, Ledger
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore


class CountedReads(LocalDirStateStore):
    """The local state store, counting the records it reads."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key):
        self.reads.append(key)
        return super().get(key)


def _job(i: str) -> Job:
    return Job(id=i, spec=parse_spec({"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy"}),
               created_at=float(len(i)), updated_at=1.0)


def _ledger_with_history(tmp_path, ended: int = 40) -> tuple[CountedReads, Ledger, list[str]]:
    store = CountedReads(tmp_path / "ledger")
    ledger = Ledger(store)
    done = []
    for n in range(ended):
        ledger.create(_job(f"j-done-{n}"))
        ledger.update(f"j-done-{n}", lambda j: setattr(j, "status", JobStatus.CANCELLED))
        done.append(f"jobs/j-done-{n}")
    ledger.create(_job("j-live"))
    return store, ledger, done


def _orchestrator(tmp_path, ledger: Ledger) -> Orchestrator:
    o = Orchestrator(Settings(store=str(tmp_path), lease_s=10), ledger,
                     Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k")), clock=lambda: 1000.0)
    o.lead()
    return o


def test_the_periodic_scan_reads_no_ended_job(tmp_path):
    store, ledger, done = _ledger_with_history(tmp_path)
    orch = _orchestrator(tmp_path, ledger)
    orch.maintain(1000.0)  # the first scan of a ledger indexes it, once (see the test below)
    while orch._rescan is not None:  # a scan reads for a tenth of a second a pass, then goes on at the next
        orch.maintain(1000.0)
    for _ in range(3):
        store.reads.clear()
        orch._next_rescan = 0.0  # a rescan is due
        orch.maintain(1000.0)
        while orch._rescan is not None:
            orch.maintain(1000.0)
        assert "jobs/j-live" in store.reads and not set(done) & set(store.reads), store.reads
    assert list(orch.active) == ["j-live"]


def test_a_ledger_from_before_the_index_is_indexed_once_and_a_lost_marker_removal_is_repaired(tmp_path):
    store, ledger, done = _ledger_with_history(tmp_path, ended=3)
    for f in (tmp_path / "ledger" / "active").glob("*.json"):
        f.unlink()  # as an older version left it: no markers
    store.put("jobs/j-old-live", json.dumps(_job("j-old-live").model_dump(mode="json")).encode())
    assert [j.id for j in ledger.active_jobs()] == ["j-live", "j-old-live"]  # found by the one full read
    assert store.get(ACTIVE_INDEXED) is not None
    store.put("active/j-done-0", b"{}")  # its end was written, the marker's removal lost
    store.reads.clear()
    assert [j.id for j in ledger.active_jobs()] == ["j-live", "j-old-live"]
    assert "jobs/j-done-1" not in store.reads and store.get("active/j-done-0") is None
