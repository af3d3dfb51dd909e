"""Block bookkeeping for blockwise jobs: which blocks are done, leased, or waiting (pure, no IO).

A blockwise prediction has thousands of blocks of a few seconds each. Writing three ledger records
per block (create, claim, finish) would cost more than many blocks take to compute, so blocks are
not jobs: the orchestrator keeps their leases in memory, in one ``BlockBook`` per parent job, and
writes the parent's summary (the done set as ranges, counts, per-node shares, timings) to the
ledger about once a second. Losing the memory (an orchestrator restart) only loses leases and the
last second of done marks; those blocks run again, which is harmless because a block always writes
the same bytes to the same whole chunks. This is the bookkeeping of daisy's scheduler, kept apart
from its IO so tests drive it with a simulated clock.

Agents pull blocks (``next``) rather than being pushed them, so the policy can prefer a block of a
model the node already holds (affinity) and the block next to its last one (locality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def to_ranges(indices: set[int] | list[int]) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs: compact for the mostly contiguous done sets."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(ranges: list[list[int]] | None) -> set[int]:
    """The inverse of ``to_ranges``."""
    return {i for a, b in (ranges or []) for i in range(a, b)}


@dataclass
class Lease:
    node: str
    expires_at: float


@dataclass
class BlockBook:
    """The blocks of one parent job and who holds which.

    Args:
        job_id: the parent job.
        model: the model's content address (affinity key).
        total: number of blocks (indices ``0..total-1``).
        voxels: core voxels per block, for throughput.
        max_errors: a block that errors this many times fails the parent.
        max_losses: a block whose holder is lost (its lease runs out) this many times fails the parent:
            a poison block that kills every node it is handed to must not be handed out forever.
    """

    job_id: str
    model: str
    total: int
    voxels: list[int]
    max_errors: int = 3
    priority: int = 0
    created_at: float = 0.0
    done: set[int] = field(default_factory=set)
    leases: dict[int, Lease] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    losses: dict[int, int] = field(default_factory=dict)  # times a block's holder vanished with it
    by_node: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    voxels_done: int = 0
    failed: str | None = None  # why the parent failed, once a block ran out of tries
    max_losses: int = 8
    dirty: bool = False
    _next: int = 0  # lowest index that may still be unassigned (a scan hint)

    # -- state ------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return len(self.done) >= self.total

    def waiting(self, now: float) -> list[int]:
        """Blocks neither done nor held under a live lease."""
        return [i for i in range(self.total) if i not in self.done and not self._held(i, now)]

    def has_waiting(self, now: float) -> bool:
        """Whether any block is free to hand out: fewer done and held than there are (no scan of the blocks:
        every block request asks, and blocks taken in order of locality leave the scan hint behind)."""
        held = sum(1 for i, lease in self.leases.items() if lease.expires_at >= now and i not in self.done)
        return len(self.done) + held < self.total

    def held_by(self, node: str) -> list[int]:
        return [i for i, lease in self.leases.items() if lease.node == node]

    def _held(self, i: int, now: float) -> bool:
        lease = self.leases.get(i)
        return lease is not None and lease.expires_at >= now

    # -- transitions --------------------------------------------------------------------------------
    def pick(self, node: str, now: float, lease_s: float, near: int | None = None) -> int | None:
        """Lease a waiting block to ``node``: the one after ``near`` if free (locality), else the lowest."""
        if self.failed or self.complete:
            return None
        if near is not None and 0 <= near + 1 < self.total:
            cand = near + 1
            if cand not in self.done and not self._held(cand, now):
                self.leases[cand] = Lease(node, now + lease_s)
                return cand
        i = self._next
        while i < self.total:
            if i not in self.done and not self._held(i, now):
                self.leases[i] = Lease(node, now + lease_s)
                return i
            if i in self.done and i == self._next:
                self._next += 1
            i += 1
        return None

    def renew(self, node: str, index: int, now: float, lease_s: float) -> bool:
        """Extend ``node``'s lease on a block; after an orchestrator restart, re-adopt it if free."""
        if index in self.done or not 0 <= index < self.total:
            return False
        lease = self.leases.get(index)
        if lease is not None and lease.node != node and lease.expires_at >= now:
            return False
        self.leases[index] = Lease(node, now + lease_s)
        return True

    def finish(self, node: str, index: int, timings: dict[str, float]) -> bool:
        """Mark a block done. A late report of a block that another node re-ran still counts once."""
        if not 0 <= index < self.total:
            return False
        if index in self.done:
            self.leases.pop(index, None)
            return False
        self.done.add(index)
        self.leases.pop(index, None)
        self.by_node[node] = self.by_node.get(node, 0) + 1
        self.voxels_done += self.voxels[index]
        for k, v in timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + float(v)
        self.dirty = True
        return True

    def error(self, node: str, index: int, message: str, permanent: bool) -> bool:
        """Record a failed block; True when that fails the parent (no tries left, or it can never work)."""
        lease = self.leases.get(index)
        if lease is not None and lease.node == node:
            del self.leases[index]
        if index in self.done:
            return False
        self.errors[index] = self.errors.get(index, 0) + 1
        self.dirty = True
        if permanent or self.errors[index] >= self.max_errors:
            self.failed = f"block {index}: {message}"
            return True
        self._next = min(self._next, index)
        return False

    def release(self, node: str, index: int) -> None:
        """The node gives a block back unfinished (it is stopping): free it now, not at lease expiry."""
        lease = self.leases.get(index)
        if lease is not None and lease.node == node:
            del self.leases[index]
            self._next = min(self._next, index)

    def expire(self, now: float) -> list[int]:
        """Drop leases that ran out; returns their blocks (to be dispatched again).

        Each expiry counts as a loss of that block's holder; a block lost ``max_losses`` times fails the parent,
        named, instead of taking down node after node.
        """
        gone = [i for i, lease in self.leases.items() if lease.expires_at < now]
        for i in gone:
            lost = self.leases.pop(i)
            if i in self.done:
                continue
            self.losses[i] = self.losses.get(i, 0) + 1
            self.dirty = True
            if self.losses[i] >= self.max_losses and not self.failed:
                self.failed = (f"block {i}: {self.losses[i]} nodes were lost while running it (last: {lost.node}); "
                               "it may exhaust a node's memory or crash its process: check that node's log")
        if gone:
            self._next = min(self._next, min(gone))
        return gone

    # -- the ledger's view ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the parent record keeps: enough to rebuild the book and to show progress."""
        return {"done": len(self.done), "done_ranges": to_ranges(self.done), "by_node": dict(self.by_node),
                "voxels_done": self.voxels_done, "timings": dict(self.timings),
                "errors": {str(k): v for k, v in self.errors.items()},
                "losses": {str(k): v for k, v in self.losses.items()}}

    @classmethod
    def restore(cls, job_id: str, model: str, voxels: list[int], blocks: dict[str, Any], max_errors: int,
                priority: int = 0, created_at: float = 0.0, max_losses: int = 8) -> "BlockBook":
        """A book from the parent's recorded summary (no leases: the holders re-adopt by heartbeat)."""
        book = cls(job_id, model, len(voxels), voxels, max_errors, priority, created_at, max_losses=max_losses)
        book.done = from_ranges(blocks.get("done_ranges"))
        book.by_node = dict(blocks.get("by_node") or {})
        book.timings = dict(blocks.get("timings") or {})
        book.voxels_done = int(blocks.get("voxels_done", 0))
        book.errors = {int(k): int(v) for k, v in (blocks.get("errors") or {}).items()}
        book.losses = {int(k): int(v) for k, v in (blocks.get("losses") or {}).items()}
        return book


def choose_book(books: list[BlockBook], models_held: set[str], now: float, prefer: str | None = None
                ) -> BlockBook | None:
    """The parent whose block a node should take next.

    Highest priority first, then a model the node already holds (affinity: no download), then the
    parent the node asked about, then the oldest (FIFO).
    """
    live = [b for b in books if not b.failed and not b.complete and b.has_waiting(now)]
    if not live:
        return None
    return min(live, key=lambda b: (-b.priority, b.model not in models_held, b.job_id != prefer,
                                    b.created_at, b.job_id))
