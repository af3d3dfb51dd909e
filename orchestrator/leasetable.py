"""Node liveness and job leases held in memory: heartbeats cost no ledger write (pure, no IO).

Every agent heartbeats every few seconds. Writing its node record and its job's lease to the ledger on
each one costs two read-modify-writes a heartbeat, which on an S3 ledger caps a deployment at a few
dozen agents. So the orchestrator keeps the newest heartbeat of each node, and each running attempt's
lease, in one ``LeaseTable``; the ledger gets a record only when it matters:

- at once when something changes hands: a node takes or leaves a job, starts draining, or is new;
- otherwise when the ledger's copy grows older than ``refresh_s`` (half a lease by default), checked
  a few times a second, at most ``per_pass`` records at a time, oldest copies first: agents that
  started together do not all come due in one burst that stalls every request behind it.

Losing the memory (an orchestrator restart) loses only renewals since the last flush; a new
orchestrator honours every lease for one more lease (``grace_until``), within which live nodes
heartbeat again, so a lost flush costs nothing but that redo.

Leases are judged by the newest heartbeat of each sender, stamped with its send time:

- a heartbeat sent before one already applied is superseded: it renews nothing and changes nothing;
- a lease runs ``lease_s`` from its heartbeat's send time (never later than when it arrived), not from
  when a backlog let the orchestrator read it, so a dead node's stale heartbeats keep nothing alive;
- a lease expires only once the orchestrator has read everything sent before its end (``seen_until``):
  after an outage, heartbeats queued behind stale ones are read before anything is judged expired.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NodeBeat:
    """A node's newest heartbeat as applied, and what of it the ledger holds."""

    sent_at: float  # the heartbeat's send time (orchestrator clock, as the sender knows it)
    job: str | None = None
    token: int | None = None
    written_at: float = float("-inf")  # the send time of the copy in the ledger


@dataclass
class JobLease:
    """A running attempt's lease: who holds it and until when."""

    node: str
    token: int
    expires_at: float
    written_expiry: float  # lease_expires_at as the ledger holds it


@dataclass(frozen=True)
class Beat:
    """What a heartbeat did: whether it was applied, and whether it renewed the attempt it named."""

    applied: bool
    renewed: bool | None  # None: it named no attempt, or it was superseded


@dataclass(frozen=True)
class Flush:
    """Records the ledger must get now: node ids and job ids."""

    nodes: list[str]
    jobs: list[str]


@dataclass(frozen=True)
class Lapsed:
    """A running attempt whose lease ran out."""

    job_id: str
    token: int
    node: str


@dataclass
class LeaseTable:
    """Newest heartbeats per node and leases per job, with what must be flushed to the ledger.

    Args:
        lease_s: how long a lease lasts after the heartbeat that renewed it.
        refresh_s: a record changed only by renewals is written once its ledger copy is this old
            (default: half a lease, so the ledger never shows a live node as silent for a lease).
        flush_every_s: how often ``due`` looks for such records.
        per_pass: how many of them one look returns at most (what changed hands comes on top).
    """

    lease_s: float
    refresh_s: float | None = None
    flush_every_s: float = 0.2
    per_pass: int = 100
    nodes: dict[str, NodeBeat] = field(default_factory=dict)
    jobs: dict[str, JobLease] = field(default_factory=dict)
    seen_until: float = float("-inf")  # everything sent before this has been read
    _urgent_nodes: set[str] = field(default_factory=set)
    _urgent_jobs: set[str] = field(default_factory=set)
    _next_flush: float = float("-inf")

    def __post_init__(self) -> None:
        if self.refresh_s is None:
            self.refresh_s = self.lease_s / 2

    # -- what arrives -------------------------------------------------------------------------------
    def beat(self, node: str, sent_at: float, now: float, job: str | None = None,
             token: int | None = None) -> Beat:
        """Apply a heartbeat of ``node`` sent at ``sent_at`` and read at ``now``, naming its attempt if any."""
        sent_at = min(sent_at, now)  # a clock running ahead extends nothing
        self.saw(sent_at)
        prior = self.nodes.get(node)
        if prior is not None and sent_at < prior.sent_at:
            return Beat(applied=False, renewed=None)
        if prior is None:
            prior = self.nodes[node] = NodeBeat(sent_at=sent_at)
            self._urgent_nodes.add(node)
        elif (prior.job, prior.token) != (job, token):
            self._urgent_nodes.add(node)  # it took or left a job: people and the scan see it at once
        prior.sent_at, prior.job, prior.token = sent_at, job, token
        if job is None or token is None:
            return Beat(applied=True, renewed=None)
        lease = self.jobs.get(job)
        if lease is None or lease.node != node or lease.token != token:
            return Beat(applied=True, renewed=False)
        lease.expires_at = max(lease.expires_at, sent_at + self.lease_s)
        return Beat(applied=True, renewed=True)

    def saw(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` was read: everything the queue holds from before it was read too."""
        self.seen_until = max(self.seen_until, sent_at)

    def caught_up(self, now: float) -> None:
        """The queue was found empty at ``now``: nothing sent before it waits unread."""
        self.seen_until = max(self.seen_until, now)

    def hold(self, job: str, token: int, node: str, expires_at: float, written: bool = True) -> None:
        """Attempt ``token`` of ``job`` is held by ``node`` until ``expires_at`` (as written to the ledger).

        Called when a lease is granted or renewed by a ledger write (a claim, a progress report), and for
        leases read from the ledger at a rescan; a lease of the same holder is never shortened by it.
        """
        lease = self.jobs.get(job)
        if lease is not None and (lease.node, lease.token) == (node, token):
            lease.expires_at = max(lease.expires_at, expires_at)
            if written:
                lease.written_expiry = expires_at
            return
        self.jobs[job] = JobLease(node=node, token=token, expires_at=expires_at,
                                  written_expiry=expires_at if written else float("-inf"))
        if not written:
            self._urgent_jobs.add(job)

    def release(self, job: str) -> None:
        """The job's attempt ended (or the job left the running ones): it holds no lease."""
        self.jobs.pop(job, None)
        self._urgent_jobs.discard(job)

    def forget_node(self, node: str) -> None:
        """The node left (bye): its record was written by whoever handled that."""
        self.nodes.pop(node, None)
        self._urgent_nodes.discard(node)

    # -- what to do -----------------------------------------------------------------------------------
    def due(self, now: float) -> Flush:
        """The records to write now: those that changed hands, and about once a second, stale copies."""
        nodes, jobs = set(self._urgent_nodes), set(self._urgent_jobs)
        if now >= self._next_flush:
            self._next_flush = now + self.flush_every_s
            old = [(b.written_at, n) for n, b in self.nodes.items() if b.sent_at - b.written_at >= self.refresh_s]
            soon = now + self.lease_s - self.refresh_s  # a ledger copy lapsing before this is rewritten
            lapsing = [(lease.written_expiry, j) for j, lease in self.jobs.items()
                       if lease.expires_at > lease.written_expiry and lease.written_expiry <= soon]
            nodes |= {n for _, n in sorted(old)[:self.per_pass]}
            jobs |= {j for _, j in sorted(lapsing)[:self.per_pass]}
        return Flush(nodes=sorted(nodes), jobs=sorted(jobs))

    def written(self, flush: Flush) -> None:
        """The records of ``flush`` reached the ledger (one that failed is simply due again next time)."""
        for n in flush.nodes:
            if (beat := self.nodes.get(n)) is not None:
                beat.written_at = beat.sent_at
            self._urgent_nodes.discard(n)
        for j in flush.jobs:
            if (lease := self.jobs.get(j)) is not None:
                lease.written_expiry = lease.expires_at
            self._urgent_jobs.discard(j)

    def lapsed(self, now: float, grace_until: float = float("-inf")) -> list[Lapsed]:
        """Attempts whose lease ran out before ``now``, judged only by heartbeats read up to their end.

        A lease still unexpired at ``seen_until`` stands: the heartbeat that renews it may be queued
        unread (a backlog after an outage). Nothing lapses before ``grace_until``.
        """
        if now < grace_until:
            return []
        until = min(now, self.seen_until)
        return [Lapsed(j, lease.token, lease.node) for j, lease in sorted(self.jobs.items())
                if lease.expires_at < until]
