"""The orchestrator: the single writer of job state. Handles requests, reaps leases, rebuilds the queue."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from dlorch.core.errors import DlorchError, StaleWrite
from dlorch.core.settings import Settings
from dlorch.core.store import DataStore
from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobStatus, NodeInfo, new_job_id, parse_spec
from dlorch.orchestrator.ledger import Leader, Ledger
from dlorch.orchestrator.blockbook import BlockBook, choose_book
from dlorch.orchestrator.leases import expired_leases, fruitless_attempts, missing_from_queue
from dlorch.orchestrator.queue import Queue

log = logging.getLogger("dlorch.orchestrator")

Reply = dict[str, Any]


class NotLeader(DlorchError):
    """Another orchestrator is alive on this ledger."""


class Orchestrator:
    """Applies requests to the ledger (compare-and-set) and keeps the queue in line with it."""

    MAINTAIN_EVERY_S = 1.0
    REQUEUE_MIN_AGE_S = 5.0
    RESCAN_EVERY_S = 30.0  # full ledger scan; between scans, maintenance uses the in-memory index
    KEEP_CHECKPOINTS = 5  # accepted checkpoints remembered per job, to fall back on a corrupt one
    FLUSH_BLOCKS_EVERY_S = 1.0  # how often a blockwise job's done set is written to the ledger
    BLOCK_TOKENS = 64  # dispatch messages per blockwise job: up to this many nodes join it from the queue

    def __init__(self, settings: Settings, ledger: Ledger, queue: Queue, clock: Callable[[], float] = time.time):
        self.settings, self.ledger, self.queue, self.clock = settings, ledger, queue, clock
        self.store_url = DataStore(settings.resolved_store()).url
        now = clock()
        self.me = Leader(id=uuid.uuid4().hex[:12], hostname=socket.gethostname(), pid=os.getpid(),
                         started_at=now, heartbeat_at=now)
        # Leases could not be renewed while no orchestrator ran: honour them for one more lease.
        self.grace_until = now + settings.lease_s
        self.last_enqueued: dict[str, float] = {}
        self._next_maintain = 0.0
        self._next_rescan = 0.0
        self.active: dict[str, Job] = {}  # queued and running jobs, as last written by this orchestrator
        # Blockwise jobs (WAITING): block leases in memory, the done set flushed to the ledger (blockbook.py).
        self.books: dict[str, BlockBook] = {}
        self.block_geometry: dict[str, list[dict]] = {}
        self.block_context: dict[str, dict] = {}
        self._tokens_sent: dict[str, float] = {}
        self._flushed_at: dict[str, float] = {}
        self._handlers: dict[str, Callable[[dict], Reply]] = {
            "submit": self.on_submit, "claim": self.on_claim, "heartbeat": self.on_heartbeat,
            "progress": self.on_progress, "finish": self.on_finish, "cancel": self.on_cancel,
            "register": self.on_register, "drain": self.on_drain, "bye": self.on_bye,
            "next_block": self.on_next_block, "block_done": self.on_block_done,
            "block_failed": self.on_block_failed, "block_release": self.on_block_release,
        }

    # -- the loop -------------------------------------------------------------------------------
    def lead(self) -> None:
        """Take leadership of the ledger or raise NotLeader."""
        if not self.ledger.claim_leadership(self.me, self.settings.lease_s, self.clock()):
            cur = self.ledger.leader()
            who = f"pid {cur[0].pid} on {cur[0].hostname}" if cur else "another process"
            raise NotLeader(f"an orchestrator is already running ({who}); use it, or stop it first")

    def step(self, timeout: float = 0.2, max_events: int = 200) -> int:
        """One iteration: handle waiting requests (waiting up to ``timeout`` for the first), maintain."""
        handled = 0
        wait = timeout
        while handled < max_events:
            msg = self.queue.events.receive(timeout=wait)
            if msg is None:
                break
            self.handle(msg)
            handled += 1
            wait = 0.0
            if time.monotonic() >= self._next_maintain:
                break  # a steady stream of heartbeats must not starve maintenance
        if time.monotonic() >= self._next_maintain:
            self.maintain(self.clock())
            self._next_maintain = time.monotonic() + self.MAINTAIN_EVERY_S
        return handled

    def run(self, stop: threading.Event) -> None:
        """Loop ``step`` until ``stop`` is set."""
        self.lead()
        log.info("orchestrator %s leading (queue %s)", self.me.id, self.queue.url)
        while not stop.is_set():
            try:
                self.step()
            except NotLeader:
                raise
            except DlorchError as e:  # e.g. Redis went away: keep trying, the ledger holds the truth
                log.warning("%s", e)
                # No node could renew its lease meanwhile: give them one lease from now.
                self.grace_until = self.clock() + self.settings.lease_s
                stop.wait(1.0)

    def handle(self, msg: dict) -> Reply:
        """Apply one request and post its reply (if it asked for one)."""
        kind = msg.get("type")
        handler = self._handlers.get(kind)
        try:
            reply = handler(msg) if handler else {"ok": False, "reason": f"unknown request {kind!r}"}
        except StaleWrite as e:
            reply = {"ok": False, "reason": str(e)}
        except DlorchError as e:
            reply = {"ok": False, "reason": str(e)}
        except Exception as e:  # a bad request must never take the orchestrator down
            log.exception("request %s failed", kind)
            reply = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
        if msg.get("rid"):
            self.queue.events.put_reply(msg["rid"], reply)
        return reply

    def maintain(self, now: float) -> None:
        """Renew leadership, requeue expired leases, put missing jobs back in the queue."""
        self.me.heartbeat_at = now
        if not self.ledger.claim_leadership(self.me, self.settings.lease_s, now):
            raise NotLeader("lost orchestrator leadership to another process")
        if time.monotonic() >= self._next_rescan:  # the index is rebuilt from the ledger now and then
            jobs = self.ledger.jobs([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.WAITING])
            self.active = {j.id: j for j in jobs if j.status is not JobStatus.WAITING}
            for job in jobs:
                if job.status is JobStatus.WAITING and job.id not in self.books:
                    self._load_book(job, now)
            self._next_rescan = time.monotonic() + self.RESCAN_EVERY_S
        self._maintain_blocks(now)
        active = list(self.active.values())
        expired = expired_leases(active, now, self.grace_until)
        for exp in expired:
            self._end_attempt(exp.job_id, exp.token, AttemptOutcome.EXPIRED, now,
                              note=f"lease of node {exp.node} expired")
        requeued = {e.job_id for e in expired}  # just enqueued by _end_attempt
        queued = [j for j in active if j.status is JobStatus.QUEUED and j.id not in requeued]
        if queued:
            messages = self.queue.jobs.items()
            for job in missing_from_queue(queued, messages, self.last_enqueued, now, self.REQUEUE_MIN_AGE_S):
                log.info("job %s missing from the queue; enqueued again", job.id)
                self._enqueue(job, now)

    # -- requests ---------------------------------------------------------------------------------
    def on_submit(self, msg: dict) -> Reply:
        spec = parse_spec(msg["spec"])
        now = self.clock()
        job = Job(id=msg.get("job_id") or new_job_id(now), spec=spec, created_at=now, updated_at=now,
                  epochs_total=spec.epochs if spec.trains else None)
        existing = self.ledger.store.get(f"jobs/{job.id}")
        if existing is None:  # a re-sent submit is the same job, not a second one
            job.log(now, f"submitted: {spec.kind} (priority {spec.priority})")
            self._create(job)
            self._enqueue(job, now)
        return {"ok": True, "job": job.id}

    def on_claim(self, msg: dict) -> Reply:
        now = self.clock()
        node, token = msg["node"], int(msg["token"])

        current = self.ledger.get(msg["job"])
        att = current.current
        if current.status is JobStatus.RUNNING and att and att.token == token and att.node == node:
            # The same claim again (its reply was lost): the node already holds it.
            return {"ok": True, "job": current.model_dump(mode="json"), "lease_expires_at": att.lease_expires_at}

        def claim(job: Job) -> None:
            if job.next_token != token or job.cancel_requested:
                raise StaleWrite(f"job {job.id} attempt {token} is not the one queued ({job.next_token})")
            job.status = JobStatus.RUNNING
            job.attempts.append(Attempt(token=token, node=node, started_at=now,
                                        lease_expires_at=now + self.settings.lease_s,
                                        epochs_start=job.epochs_done, epochs_done=job.epochs_done,
                                        resumed_from=job.checkpoint))
            job.updated_at = now
            how = f"resumed from epoch {job.epochs_done}" if job.checkpoint else "started"
            job.log(now, f"attempt {token} {how} on node {node}")

        job = self._update(msg["job"], claim, expect=[JobStatus.QUEUED])
        self.last_enqueued.pop(job.id, None)
        return {"ok": True, "job": job.model_dump(mode="json"), "lease_expires_at": now + self.settings.lease_s}

    def on_heartbeat(self, msg: dict) -> Reply:
        now = self.clock()
        node = self._touch_node(msg["node"], now, job=msg.get("job"), attempt=msg.get("token"))
        reply: Reply = {"ok": True, "drain": bool(node and node.drain), "lease": None, "register": node is None}
        if msg.get("job") and msg.get("token") is not None:
            reply["lease"] = self._renew(msg["job"], int(msg["token"]), msg["node"], now)
        gone = set()
        for job_id, index in msg.get("blocks") or []:  # blocks the node holds (computing or prefetched)
            book = self._book(job_id)
            if book is None:
                gone.add(job_id)  # cancelled, failed or done: the node stops taking its blocks
            else:  # a block done meanwhile, or re-leased to another node, is not renewed; no harm either way
                book.renew(msg["node"], int(index), now, self.settings.lease_s)
        if gone:
            reply["jobs_gone"] = sorted(gone)
        return reply

    def on_progress(self, msg: dict) -> Reply:
        now = self.clock()
        token, node = int(msg["token"]), msg["node"]

        def progress(job: Job) -> None:
            att = self._holder(job, token, node)
            ckpt = msg.get("checkpoint")
            resumed = msg.get("resumed_from")
            if resumed is not None:  # the attempt fell back to an older checkpoint (the newer was unreadable)
                if resumed and resumed not in {uri for _, uri in job.checkpoints}:
                    raise StaleWrite(f"{resumed} is not a checkpoint this job accepted")
                att.resumed_from, att.epochs_start = resumed or None, int(msg["epochs_done"])
                job.checkpoints = [(e, u) for e, u in job.checkpoints if e <= int(msg["epochs_done"])]
                job.checkpoint = resumed or None
                job.log(now, f"attempt {token} resumed from epoch {msg['epochs_done']} ({msg.get('why', '')})")
            elif ckpt and not self._owned(ckpt, job.id, token):
                raise StaleWrite(f"checkpoint {ckpt} is outside attempt {token}'s keys")
            att.epochs_done = job.epochs_done = int(msg["epochs_done"])
            att.lease_expires_at = now + self.settings.lease_s
            if msg.get("epochs_total") and job.epochs_total is None:
                job.epochs_total = int(msg["epochs_total"])
            if msg.get("plan") and job.plan is None:
                job.plan = msg["plan"]
            if ckpt and resumed is None:
                job.checkpoint = ckpt
                job.checkpoints = [*job.checkpoints, (att.epochs_done, ckpt)][-self.KEEP_CHECKPOINTS:]
            job.metrics.update(msg.get("metrics") or {})
            job.updated_at = now

        self._update(msg["job"], progress, expect=[JobStatus.RUNNING])
        return {"ok": True}

    def on_finish(self, msg: dict) -> Reply:
        outcome = AttemptOutcome(msg["outcome"])
        if outcome is AttemptOutcome.SPLIT:
            return self._split(msg)
        return self._end_attempt(msg["job"], int(msg["token"]), outcome, self.clock(), node=msg["node"], msg=msg)

    def _split(self, msg: dict) -> Reply:
        """A planner attempt cut a blockwise job into blocks: record the plan, then hand blocks out."""
        now, token, node = self.clock(), int(msg["token"]), msg["node"]
        blocks = msg["blocks"]
        job = self.ledger.get(msg["job"])
        self._holder(job, token, node)
        if msg["output"] not in (job.spec.output, f"{self.store_url}/jobs/{job.id}/output.zarr"):
            raise StaleWrite(f"output {msg['output']} is not this job's")
        # The plan first: a WAITING job always has one to rebuild its book from.
        plan = {"blocks": blocks, "norm": msg.get("norm"), "priors": msg.get("priors")}
        self.ledger.put_block_plan(job.id, plan)

        def split(job: Job) -> None:
            att = self._holder(job, token, node)
            att.outcome, att.ended_at, att.lease_expires_at = AttemptOutcome.SPLIT, now, None
            att.timings.update(msg.get("timings") or {})
            job.status, job.output, job.updated_at = JobStatus.WAITING, msg["output"], now
            job.blocks = {"total": len(blocks), "done": 0, "by_node": {}, "voxels_total": msg.get("voxels", 0),
                          "voxels_done": 0, "started_at": now, "timings": {}, "done_ranges": [], "errors": {}}
            job.log(now, f"split into {len(blocks)} blocks by node {node}")

        parent = self._update(msg["job"], split, expect=[JobStatus.RUNNING])
        self._load_book(parent, now, plan)
        self._send_block_tokens(parent.id, len(blocks), now)
        return {"ok": True, "status": parent.status.value}

    # -- blocks ---------------------------------------------------------------------------------------
    def _load_book(self, job: Job, now: float, plan: dict | None = None) -> BlockBook | None:
        """Build the in-memory book of a WAITING job from its plan and recorded progress."""
        plan = plan or self.ledger.block_plan(job.id)
        if plan is None:
            log.warning("blockwise job %s has no block plan; failing it", job.id)
            self._fail_parent(job.id, "its block plan is missing from the ledger; submit it again", now)
            return None
        geometry = plan["blocks"]
        voxels = [_voxels(b["core"]) for b in geometry]
        book = BlockBook.restore(job.id, job.spec.model or "", voxels, job.blocks or {},
                                 job.spec.max_attempts or self.settings.max_attempts, job.spec.priority,
                                 job.created_at)
        self.books[job.id] = book
        self.block_geometry[job.id] = geometry
        self.block_context[job.id] = {"spec": job.spec.model_dump(mode="json"), "output": job.output,
                                      "norm": plan.get("norm"), "priors": plan.get("priors")}
        self._tokens_sent.setdefault(job.id, now)  # holders re-adopt their blocks by heartbeat first
        self._flushed_at[job.id] = now
        return book

    def _send_block_tokens(self, job_id: str, waiting: int, now: float) -> None:
        """Put dispatch messages for a blockwise job in the queue; a node that takes one pulls blocks."""
        book = self.books[job_id]
        for _ in range(min(waiting, self.BLOCK_TOKENS)):
            self.queue.jobs.send({"job": job_id, "token": 0, "kind": "blocks"}, priority=book.priority)
        self._tokens_sent[job_id] = now

    def on_next_block(self, msg: dict) -> Reply:
        """Lease a block to a node: affinity to models it holds, then locality to its last block."""
        now, node = self.clock(), msg["node"]
        self._book(msg.get("job"))  # the job the node asks about may not be loaded yet after a restart
        book = choose_book(list(self.books.values()), set(msg.get("models") or []), now, msg.get("job"))
        if book is None:
            return {"ok": True, "block": None}
        if any(j.status is JobStatus.QUEUED and j.spec.priority > book.priority for j in self.active.values()):
            # A more urgent job waits in the queue: send the node back to it (this job's dispatch
            # messages, re-sent by maintenance if need be, bring nodes back afterwards).
            return {"ok": True, "block": None}
        near = msg.get("after") if msg.get("job") == book.job_id else None
        index = book.pick(node, now, self.settings.lease_s, near=near)
        if index is None:
            return {"ok": True, "block": None}
        g = self.block_geometry[book.job_id][index]
        reply: Reply = {"ok": True, "job": book.job_id, "block": {"index": index, "core": g["core"], "read": g["read"]}}
        if book.job_id not in (msg.get("have") or []):
            reply["context"] = self.block_context[book.job_id]
        return reply

    def _book(self, job_id: str | None) -> BlockBook | None:
        """A blockwise job's book: in memory, or loaded from the ledger if the job is still WAITING.

        Reports and requests may arrive before the first rescan after a restart (they waited in the queue).
        """
        if not job_id:
            return None
        book = self.books.get(job_id)
        if book is None:
            got = self.ledger.store.get(f"jobs/{job_id}")
            if got is not None:
                job = Job.model_validate_json(got[0])
                if job.status is JobStatus.WAITING:
                    book = self._load_book(job, self.clock())
        return book

    def on_block_done(self, msg: dict) -> Reply:
        book = self._book(msg["job"])
        if book is None:
            return {"ok": False, "reason": f"job {msg['job']} has no blocks in progress"}
        book.finish(msg["node"], int(msg["block"]), msg.get("timings") or {})
        if book.complete:
            self._flush_book(book, self.clock())
        return {"ok": True}

    def on_block_failed(self, msg: dict) -> Reply:
        book = self._book(msg["job"])
        if book is None:
            return {"ok": False, "reason": f"job {msg['job']} has no blocks in progress"}
        log.info("block %s of %s failed on %s: %s", msg["block"], book.job_id, msg["node"], msg.get("error"))
        if book.error(msg["node"], int(msg["block"]), msg.get("error") or "unknown error", bool(msg.get("permanent"))):
            self._flush_book(book, self.clock())
        return {"ok": True}

    def on_block_release(self, msg: dict) -> Reply:
        book = self._book(msg["job"])
        if book is not None:
            book.release(msg["node"], int(msg["block"]))
        return {"ok": True}

    def _maintain_blocks(self, now: float) -> None:
        """Expire block leases, flush done sets, and re-dispatch blockwise jobs that no node works on."""
        for book in list(self.books.values()):
            if now >= self.grace_until:
                gone = book.expire(now)
                if gone:
                    log.info("block leases of %s expired (%d blocks); handing them out again", book.job_id, len(gone))
            if book.dirty and now - self._flushed_at.get(book.job_id, 0.0) >= self.FLUSH_BLOCKS_EVERY_S:
                self._flush_book(book, now)
            if book.job_id not in self.books or book.leases or not book.has_waiting(now):
                continue
            if now - self._tokens_sent.get(book.job_id, float("-inf")) < self.REQUEUE_MIN_AGE_S:
                continue
            if any(m.get("job") == book.job_id for m in self.queue.jobs.items()):
                self._tokens_sent[book.job_id] = now
                continue
            log.info("blockwise job %s has waiting blocks and no node on it; dispatched again", book.job_id)
            self._send_block_tokens(book.job_id, len(book.waiting(now)), now)

    def _flush_book(self, book: BlockBook, now: float) -> None:
        """Write a book's progress to its parent record; end the parent when all blocks are done or one failed."""

        def apply(job: Job) -> None:
            job.blocks = {**(job.blocks or {}), **book.summary()}
            if book.failed:
                job.status, job.error = JobStatus.FAILED, book.failed
                job.log(now, f"failed: {book.failed}")
            elif book.complete:
                job.status = JobStatus.SUCCEEDED
                job.blocks["finished_at"] = now
                job.log(now, f"all {book.total} blocks done")
            job.updated_at = now

        t0 = time.perf_counter()
        try:
            job = self._update(book.job_id, apply, expect=[JobStatus.WAITING])
        except StaleWrite as e:  # cancelled meanwhile
            log.info("%s", e)
            self._drop_book(book.job_id)
            return
        book.dirty = False
        book.timings["ledger_flush_s"] = book.timings.get("ledger_flush_s", 0.0) + time.perf_counter() - t0
        self._flushed_at[book.job_id] = now
        if job.status.is_terminal():
            self._drop_book(book.job_id)

    def _fail_parent(self, job_id: str, error: str, now: float) -> None:
        def fail(job: Job) -> None:
            job.status, job.error, job.updated_at = JobStatus.FAILED, error, now
            job.log(now, f"failed: {error}")

        try:
            self._update(job_id, fail, expect=[JobStatus.WAITING])
        except StaleWrite:
            pass
        self._drop_book(job_id)

    def _drop_book(self, job_id: str) -> None:
        for d in (self.books, self.block_geometry, self.block_context, self._tokens_sent, self._flushed_at):
            d.pop(job_id, None)

    def on_cancel(self, msg: dict) -> Reply:
        now = self.clock()

        def cancel(job: Job) -> None:
            if job.status.is_terminal():
                raise StaleWrite(f"job {job.id} already {job.status.value}")
            if job.current and job.current.outcome is AttemptOutcome.RUNNING:
                job.current.outcome, job.current.ended_at = AttemptOutcome.CANCELLED, now
            job.status, job.cancel_requested, job.updated_at = JobStatus.CANCELLED, True, now
            job.log(now, "cancelled by the user")

        job = self._update(self.ledger.resolve(msg["job"]), cancel)
        self._drop_book(job.id)  # its queued dispatch messages find no blocks and are dropped
        return {"ok": True, "job": job.id}

    def on_register(self, msg: dict) -> Reply:
        now = self.clock()
        info = NodeInfo.model_validate({**msg["node_info"], "registered_at": now, "heartbeat_at": now})
        old = self.ledger.node(info.id)
        if old is not None:
            info.registered_at, info.drain = old.registered_at, old.drain
        self.ledger.put_node(info)
        return {"ok": True}

    def on_drain(self, msg: dict) -> Reply:
        nodes = [n for n in self.ledger.nodes() if n.id == msg["node"] or n.id.startswith(msg["node"])]
        if len(nodes) != 1:
            return {"ok": False, "reason": f"no single node matches {msg['node']!r}; see `dlorch nodes`"}
        node = nodes[0]
        node.drain, node.state = True, ("draining" if node.state != "gone" else "gone")
        self.ledger.put_node(node)
        return {"ok": True, "node": node.id}

    def on_bye(self, msg: dict) -> Reply:
        node = self.ledger.node(msg["node"])
        if node is not None:
            node.state, node.job, node.attempt, node.heartbeat_at = "gone", None, None, self.clock()
            self.ledger.put_node(node)
        return {"ok": True}

    # -- helpers ----------------------------------------------------------------------------------
    def _create(self, job: Job) -> None:
        self.ledger.create(job)
        self._track(job)

    def _update(self, job_id: str, change, expect=None) -> Job:
        job = self.ledger.update(job_id, change, expect=expect)
        self._track(job)
        return job

    def _track(self, job: Job) -> None:
        """Keep the in-memory index of active jobs that maintenance scans (the orchestrator writes them all)."""
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            self.active[job.id] = job
        else:
            self.active.pop(job.id, None)

    def _enqueue(self, job: Job, now: float) -> None:
        self.queue.jobs.send({"job": job.id, "token": job.next_token, "kind": job.spec.kind},
                             priority=job.spec.priority)
        self.last_enqueued[job.id] = now

    def _holder(self, job: Job, token: int, node: str | None) -> Attempt:
        """The attempt if it holds the lease, else StaleWrite (fencing)."""
        att = job.current
        if job.status is not JobStatus.RUNNING or att is None or att.token != token or (node and att.node != node):
            raise StaleWrite(f"attempt {token} of job {job.id} does not hold the lease")
        return att

    @staticmethod
    def _owned(uri: str, job_id: str, token: int) -> bool:
        return f"/jobs/{job_id}/attempts/{token}/" in uri.replace("\\", "/")

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

    def _end_attempt(self, job_id: str, token: int, outcome: AttemptOutcome, now: float,
                     node: str | None = None, msg: dict | None = None, note: str = "") -> Reply:
        msg = msg or {}
        requeue = False

        def end(job: Job) -> None:
            nonlocal requeue
            prior = next((a for a in job.attempts if a.token == token), None)
            if prior is not None and prior.outcome is outcome and job.status is not JobStatus.RUNNING:
                return  # the same report again (its first reply was lost): already applied
            att = self._holder(job, token, node)
            att.outcome, att.ended_at, att.lease_expires_at = outcome, now, None
            att.timings.update(msg.get("timings") or {})
            if "epochs_done" in msg:
                att.epochs_done = job.epochs_done = int(msg["epochs_done"])
            for field in ("checkpoint", "model", "output"):
                uri = msg.get(field)
                if uri:
                    if not self._owned(uri, job.id, token):
                        raise StaleWrite(f"{field} {uri} is outside attempt {token}'s keys")
                    setattr(job, field, uri)
            job.metrics.update(msg.get("metrics") or {})
            if msg.get("plan") and job.plan is None:
                job.plan = msg["plan"]
            if msg.get("epochs_total"):
                job.epochs_total = int(msg["epochs_total"])
            job.updated_at = now
            if outcome is AttemptOutcome.SUCCEEDED:
                job.status, job.error = JobStatus.SUCCEEDED, None
                job.log(now, f"attempt {token} succeeded on node {att.node}")
                return
            if outcome is AttemptOutcome.ERRORED:
                att.error = msg.get("error") or "unknown error"
                job.log(now, f"attempt {token} failed on node {att.node}: {att.error}")
            else:
                job.log(now, note or f"attempt {token} {outcome.value} at epoch {job.epochs_done}")
            limit = job.spec.max_attempts or self.settings.max_attempts
            errors, losses = fruitless_attempts(job)
            if msg.get("permanent") or errors >= limit or losses >= self.settings.max_node_losses:
                job.status = JobStatus.FAILED
                job.error = att.error or f"{losses} nodes in a row were lost running it without progress"
                job.log(now, f"failed: {job.error}")
                return
            job.status, job.next_token = JobStatus.QUEUED, token + 1
            requeue = True

        job = self._update(job_id, end)
        if requeue:
            self._enqueue(job, now)
        return {"ok": True, "status": job.status.value}


def _voxels(core: list[list[int]]) -> int:
    n = 1
    for a, b in core:
        n *= b - a
    return n
