"""Fixtures of the unit tests: an orchestrator in-process on a SQLite queue and a local ledger, with a simulated clock."""

import pytest

from dlorch.core.settings import Settings
from dlorch.core.wire import Signer
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def leading_orchestrator(tmp_path, store=None) -> Orchestrator:
    """A leading orchestrator on ``store`` (a local ledger by default), its clock as ``clock_``, its store as ``store_``."""
    clock = Clock()
    store = store if store is not None else LocalDirStateStore(tmp_path / "ledger")
    o = Orchestrator(Settings(store=str(tmp_path), lease_s=10, max_attempts=2), Ledger(store),
                     Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k")), clock=clock)
    o.lead()
    o.clock_, o.store_ = clock, store
    return o


@pytest.fixture
def orch(tmp_path):
    return leading_orchestrator(tmp_path)
