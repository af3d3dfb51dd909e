"""The periodic rescan of the ledger's active jobs, read a few records at a time so no pass stalls.

The orchestrator keeps the jobs that may still run in memory and rebuilds that index from the ledger now
and then. On S3 a record takes tens of milliseconds to read: reading two thousand at once would hold up
every request for most of a minute, long enough for heartbeats to queue past a lease. So a ``Rescan``
reads records until its time for the pass is up and goes on at the next pass; once complete, its jobs
replace those of the index that were not written meanwhile (``touched``: the orchestrator's own writes
since the scan began are newer than what the scan read).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from dlorch.core.spec import Job


class Rescan:
    """Active jobs read from ``jobs`` (an iterator over the ledger) over as many passes as it takes."""

    def __init__(self, jobs: Iterator[Job], clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs, self.clock = jobs, clock
        self.read: list[Job] = []
        self.touched: set[str] = set()  # jobs the orchestrator wrote since the scan began
        self.complete = False

    def step(self, budget_s: float) -> bool:
        """Read records for about ``budget_s`` (at least one); True once every record was read."""
        deadline = self.clock() + budget_s
        for job in self.jobs:
            self.read.append(job)
            if self.clock() >= deadline:
                return False
        self.complete = True
        return True

    def wrote(self, job_id: str) -> None:
        """The orchestrator wrote this job meanwhile: its own copy is newer than the scan's."""
        self.touched.add(job_id)

    def fresh(self) -> list[Job]:
        """The jobs read that the orchestrator did not write since the scan began."""
        return [j for j in self.read if j.id not in self.touched]
