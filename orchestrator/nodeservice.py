"""The orchestrator's node requests: register, heartbeat (liveness and lease renewal), drain, bye.

A mixin of ``Orchestrator`` (service.py), which supplies the ledger, the settings, the clock,
``_update`` / ``_holder`` and the block books (blockservice.py). Requests arrive typed
(``core/protocol.py``); a node's own requests were checked to come from that node.
"""

from __future__ import annotations

from dlorch.core.errors import DlorchError, StaleWrite
from dlorch.core.protocol import Bye, Drain, DrainReply, Heartbeat, HeartbeatReply, Register, Reply, refusal
from dlorch.core.spec import Job, JobStatus, NodeInfo


class NodeHandlers:
    """Node registration, liveness and leaving; a heartbeat also renews the leases the node holds."""

    def on_register(self, req: Register) -> Reply:
        """Record a node. The same id registering again is a new agent: an old drain does not concern it."""
        now = self.clock()
        info = NodeInfo.model_validate({**req.node_info.model_dump(), "registered_at": now, "heartbeat_at": now})
        old = self.ledger.node(info.id)
        if old is not None:
            info.registered_at = old.registered_at
        self.ledger.put_node(info)
        return Reply()

    def on_heartbeat(self, req: Heartbeat) -> HeartbeatReply:
        now = self.clock()
        node = self._touch_node(req.node, now, job=req.job, attempt=req.token)
        reply = HeartbeatReply(drain=bool(node and node.drain), lease=None, register_again=node is None)
        if req.job and req.token is not None:
            reply.lease = self._renew(req.job, req.token, req.node, now)
        gone = set()
        for job_id, index in req.blocks:  # blocks the node holds (computing or prefetched)
            book = self._book(job_id)
            if book is None:
                gone.add(job_id)  # cancelled, failed or done: the node stops taking its blocks
            else:  # a block done meanwhile, or re-leased to another node, is not renewed; no harm either way
                book.renew(req.node, index, now, self.settings.lease_s)
        if gone:
            reply.jobs_gone = sorted(gone)
        return reply

    def on_drain(self, req: Drain) -> Reply:
        nodes = [n for n in self.ledger.nodes() if n.id == req.node or n.id.startswith(req.node)]
        if len(nodes) != 1:
            return refusal(f"no single node matches {req.node!r}; see `dlorch nodes`")
        node = nodes[0]
        node.drain, node.state = True, ("draining" if node.state != "gone" else "gone")
        self.ledger.put_node(node)
        return DrainReply(node=node.id)

    def on_bye(self, req: Bye) -> Reply:
        node = self.ledger.node(req.node)
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

    def _touch_node(self, node_id: str, now: float, job: str | None, attempt: int | None) -> NodeInfo | None:
        node = self.ledger.node(node_id)
        if node is None:
            return None
        node.heartbeat_at, node.job, node.attempt = now, job, attempt
        node.state = "draining" if node.drain else ("busy" if job else "idle")
        self.ledger.put_node(node)
        return node
