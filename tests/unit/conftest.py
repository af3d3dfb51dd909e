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


@pytest.fixture
def orch(tmp_path):
    clock = Clock()
    s = Settings(store=str(tmp_path), lease_s=10, max_attempts=2)
    o = Orchestrator(s, Ledger(LocalDirStateStore(tmp_path / "ledger")),
                     Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k")), clock=clock)
    o.lead()
    o.clock_ = clock
    return o
