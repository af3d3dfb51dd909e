"""The orchestrator's node requests: register, heartbeat (liveness and lease renewal), drain, bye.

A mixin of ``Orchestrator`` (service.py), which supplies the ledger, the settings, the clock,
``_update`` / ``_holder``, the block books (blockservice.py) and the lease table (leasetable.py): a
heartbeat renews leases in memory; a node's record reaches the ledger when it takes or leaves a job, and
all renewals together in one liveness record every few seconds (``flush_leases``, time-bounded), so a
heartbeat costs no ledger write as a rule. Requests arrive typed (``core/protocol.py``); a node's own
requests were checked to come from that node.
"""

from __future__ import annotations

import time

from dlorch.core.errors import DlorchError, StaleWrite
from dlorch.core.protocol import Bye, Drain, DrainReply, Heartbeat, HeartbeatReply, Register, Reply, refusal
from dlorch.core.spec import Job, JobStatus, NodeInfo
from dlorch.orchestrator.leasetable import Flush, Lapsed


class NodeHandlers:
    """Node registration, liveness and leaving; a heartbeat also renews the leases the node holds."""

    def on_register(self, req: Register) -> Reply:
        """Record a node. The same id registering again is a new agent: an old drain does not concern it."""
        now = self.clock()
        info = NodeInfo.model_validate({**req.node_info.model_dump(), "registered_at": now, "heartbeat_at": now})
        info = self.ledger.register_node(info)  # one that registered before keeps its first registration time
        self.node_infos[info.id] = info
        return Reply()

    def on_heartbeat(self, req: Heartbeat) -> HeartbeatReply:
        now = self.clock()
        sent = self.sent_at if self.sent_at is not None else now  # its send time; a direct call's is now
        node = self._node_info(req.node)
        reply = HeartbeatReply(drain=bool(node and node.drain), lease=None, register_again=node is None)
        beat = self.leasetable.beat(req.node, sent, now, job=req.job, token=req.token)
        if not beat.applied:  # a newer heartbeat of this node was applied already: this one says nothing
            return reply
        if node is not None:
            node.heartbeat_at, node.job, node.attempt = now, req.job, req.token
            node.state = "draining" if node.drain else ("busy" if req.job else "idle")
        if req.job and req.token is not None:  # a lease not in memory (a job claimed before a restart): the ledger
            reply.lease = beat.renewed or self._renew(req.job, req.token, req.node, now)
        gone = set()
        for job_id, index in req.blocks:  # blocks the node holds (computing or prefetched)
            book = self._book(job_id)
            if book is None:
                gone.add(job_id)  # cancelled, failed or done: the node stops taking its blocks
            else:  # a block done meanwhile, or re-leased to another node, is not renewed; no harm either way
                book.renew(req.node, index, now, self.settings.lease_s)
        if gone:
            reply.jobs_gone = sorted(gone)
        self.flush_leases(now)
        return reply

    def on_drain(self, req: Drain) -> Reply:
        nodes = [n for n in self.ledger.nodes() if n.id == req.node or n.id.startswith(req.node)]
        if len(nodes) != 1:
            return refusal(f"no single node matches {req.node!r}; see `dlorch nodes`")
        node = self.node_infos.get(nodes[0].id, nodes[0])  # the newest heartbeat's record, if in memory
        node.drain, node.state = True, ("draining" if node.state != "gone" else "gone")
        self.ledger.put_node(node)
        self.node_infos[node.id] = node
        return DrainReply(node=node.id)

    def on_bye(self, req: Bye) -> Reply:
        node = self.ledger.node(req.node)
        self.node_infos.pop(req.node, None)
        self.leasetable.forget_node(req.node)
        if node is not None:
            node.state, node.job, node.attempt, node.heartbeat_at = "gone", None, None, self.clock()
            self.ledger.put_node(node)
        return Reply()

    def _renew(self, job_id: str, token: int, node: str, now: float) -> bool:
        def renew(job: Job) -> None:
            self._holder(job, token, node).lease_expires_at = now + self.settings.lease_s

        try:
            self._update(job_id, renew, expect=[JobStatus.RUNNING])
            return True
        except (StaleWrite, DlorchError):
            return False

    def _node_info(self, node_id: str) -> NodeInfo | None:
        """A node's record as this orchestrator keeps it (read from the ledger once), None if unknown."""
        node = self.node_infos.get(node_id)
        if node is None and (node := self.ledger.node(node_id)) is not None:
            self.node_infos[node_id] = node
        return node

    FLUSH_BUDGET_S = 0.05  # ledger writes of one flush stop once they took this long (the rest wait their turn)

    def flush_leases(self, now: float) -> None:
        """Write what the lease table says is due: records that changed hands, and the liveness record.

        Time-bounded: on a slow ledger (S3) the writes stop after ``FLUSH_BUDGET_S`` (at least one goes);
        what is left stays due and goes with a later flush, so requests are never held up for long.
        """
        due = self.leasetable.due(now)
        if not due.nodes and not due.jobs and not due.live:
            return
        t0 = time.monotonic()
        done = Flush(nodes=[], jobs=[])
        for node_id in due.nodes:
            if (node := self.node_infos.get(node_id)) is not None:
                self.ledger.put_node(node)
            done.nodes.append(node_id)
            if time.monotonic() - t0 >= self.FLUSH_BUDGET_S:
                break
        for job_id in due.jobs:
            if time.monotonic() - t0 >= self.FLUSH_BUDGET_S:
                break
            lease = self.leasetable.jobs.get(job_id)
            if lease is None:
                continue
            if self._renew(job_id, lease.token, lease.node, lease.expires_at - self.settings.lease_s):
                done.jobs.append(job_id)
            else:  # the ledger says otherwise (the next rescan reads who holds it)
                self.leasetable.release(job_id)
        live = due.live and (not done.nodes or time.monotonic() - t0 < self.FLUSH_BUDGET_S)
        if live:
            self.ledger.put_liveness(self.leasetable.live_record())
        self.leasetable.written(Flush(nodes=done.nodes, jobs=done.jobs, live=live), now)

    def lapsed_leases(self, now: float) -> list[Lapsed]:
        """Flush what is due, then the attempts whose lease ran out, judged up to what the queue let us read."""
        if self.queue.events.size() == 0:  # nothing waits unread: leases are judged up to now
            self.leasetable.caught_up(now)
        self.flush_leases(now)
        return self.leasetable.lapsed(now, self.grace_until)

    def sync_leases(self) -> None:
        """The lease table after a rescan of the ledger: the running attempts of ``active``, no other."""
        for job_id in set(self.leasetable.jobs) - set(self.active):
            self.leasetable.release(job_id)
        for job in self.active.values():
            self.track_lease(job)
        if not getattr(self, "_liveness_read", False):  # the first scan: renewals only the liveness record holds
            self._liveness_read = True
            for job_id, held in (self.ledger.liveness().get("jobs") or {}).items():
                att = job.current if (job := self.active.get(job_id)) is not None else None
                if (att and isinstance(held, dict) and (held.get("token"), held.get("node")) == (att.token, att.node)
                        and isinstance(held.get("expires_at"), (int, float))):
                    self.leasetable.hold(job_id, att.token, att.node, float(held["expires_at"]))

    def track_lease(self, job: Job) -> None:
        """The lease table's view of a job just written or read: who holds its running attempt until when."""
        att = job.current
        if job.status is JobStatus.RUNNING and att and att.node and att.lease_expires_at is not None:
            self.leasetable.hold(job.id, att.token, att.node, att.lease_expires_at)
        else:
            self.leasetable.release(job.id)
