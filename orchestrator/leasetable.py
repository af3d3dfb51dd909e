"""Node liveness and job leases held in memory: heartbeats cost no ledger write (pure, no IO).

Every agent heartbeats every few seconds. Writing its node record and its job's lease to the ledger on
each one costs two read-modify-writes a heartbeat, which on an S3 ledger caps a deployment at a few
dozen agents; even refreshing each record once per half lease costs a thousand agents 130 writes a
second, more than an S3 round trip of tens of milliseconds allows one loop. So the orchestrator keeps
the newest heartbeat of each node, and each running attempt's lease, in one ``LeaseTable``; the ledger
gets:

- the node's own record at once when something changes hands: a node takes or leaves a job, or is new
  (one write per event, never per heartbeat), a few at a time, oldest first, so that a thousand agents
  joining together do not stall every request behind their writes;
- every renewal in one record, the liveness record (``live_record``: each node's newest heartbeat and
  each lease's end), written about every ``live_every_s`` while anything was renewed: one write a pass,
  whatever the number of agents. Readers of node records take the newer of the two (``Ledger.nodes``).

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
from itertools import islice


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
    """Records the ledger must get now: node ids and job ids, and whether the liveness record is due."""

    nodes: list[str]
    jobs: list[str]
    live: bool = False


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
        live_every_s: how often the liveness record is written while renewals came in (its copy of a
            heartbeat or a lease is never much older than this).
        urgent_per_pass: how many node records that changed hands one look returns at most (oldest first),
            and ``urgent_every_s`` how long after a write of some the next are due.
    """

    lease_s: float
    live_every_s: float = 2.0
    urgent_per_pass: int = 10
    urgent_every_s: float = 0.2
    nodes: dict[str, NodeBeat] = field(default_factory=dict)
    jobs: dict[str, JobLease] = field(default_factory=dict)
    seen_until: float = float("-inf")  # everything sent before this has been read
    _urgent_nodes: dict[str, float] = field(default_factory=dict)  # node -> when it changed hands
    _urgent_jobs: set[str] = field(default_factory=set)
    _next_urgent: float = float("-inf")
    _next_live: float = float("-inf")
    _live_dirty: bool = False  # renewed since the liveness record was last written

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
            self._urgent_nodes.setdefault(node, now)
        elif (prior.job, prior.token) != (job, token):
            self._urgent_nodes.setdefault(node, now)  # it took or left a job: people and the scan see it soon
        prior.sent_at, prior.job, prior.token = sent_at, job, token
        self._live_dirty = True
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
        self._urgent_nodes.pop(node, None)

    # -- what to do -----------------------------------------------------------------------------------
    def due(self, now: float) -> Flush:
        """The records to write now: a few of those that changed hands, and now and then the liveness record."""
        nodes = list(islice(self._urgent_nodes, self.urgent_per_pass)) if now >= self._next_urgent else []
        live = self._live_dirty and now >= self._next_live
        return Flush(nodes=nodes, jobs=sorted(self._urgent_jobs), live=live)

    def unwritten(self) -> list[str]:
        """The nodes whose change of hands waits for its record to be written, oldest first."""
        return list(self._urgent_nodes)

    def live_record(self) -> dict:
        """The liveness record: each node's newest heartbeat (send time) and each running attempt's lease."""
        return {"nodes": {n: b.sent_at for n, b in self.nodes.items()},
                "jobs": {j: {"token": lease.token, "node": lease.node, "expires_at": lease.expires_at}
                         for j, lease in self.jobs.items()}}

    def written(self, flush: Flush, now: float | None = None) -> None:
        """The records of ``flush`` reached the ledger (one that failed is simply due again next time).

        ``now``: when it was written; the next node records are due ``urgent_every_s`` later, the liveness
        record ``live_every_s`` later.
        """
        since = now if now is not None else float("-inf")
        if flush.nodes:
            self._next_urgent = since + self.urgent_every_s
        for n in flush.nodes:
            if (beat := self.nodes.get(n)) is not None:
                beat.written_at = beat.sent_at
            self._urgent_nodes.pop(n, None)
        for j in flush.jobs:
            if (lease := self.jobs.get(j)) is not None:
                lease.written_expiry = lease.expires_at
            self._urgent_jobs.discard(j)
        if flush.live:
            self._live_dirty = False
            self._next_live = since + self.live_every_s

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
