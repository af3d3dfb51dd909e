"""The orchestrator: the single writer of job state. Handles requests, reaps leases, rebuilds the queue.

A job's way through it: ``on_submit`` writes it QUEUED and sends a dispatch message; ``on_claim`` gives the
node a lease under a new attempt token; ``on_progress`` records checkpoints under that attempt's keys and
renews the lease; ``on_finish`` (or a lease that ``maintain`` finds expired) ends the attempt, and
``leases.after_attempt`` decides whether the job succeeds, is queued again or fails. The decisions live in
``leases.py`` as pure functions; this module carries them out against the ledger and the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dlorch.core.errors import DlorchError, StaleWrite
from dlorch.core.settings import Settings
from dlorch.core.store import DataStore
from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobStatus, NodeInfo, new_job_id, parse_spec
from dlorch.orchestrator.leadership import Verdict, new_leader
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.blockservice import BlockHandlers, Reply
from dlorch.orchestrator.leases import AfterAttempt, Next, after_attempt, expired_leases, missing_from_queue
from dlorch.orchestrator.queue import Queue

log = logging.getLogger("dlorch.orchestrator")


class NotLeader(DlorchError):
    """Another orchestrator is alive on this ledger."""


class Orchestrator(BlockHandlers):
    """Applies requests to the ledger (compare-and-set) and keeps the queue in line with it."""

    MAINTAIN_EVERY_S = 1.0
    REQUEUE_MIN_AGE_S = 5.0
    RESCAN_EVERY_S = 30.0  # full ledger scan; between scans, maintenance uses the in-memory index
    KEEP_CHECKPOINTS = 5  # accepted checkpoints remembered per job, to fall back on a corrupt one
    WATCH_LEADER_EVERY_S = 0.2  # how often a claimant looks at the heartbeat counter of a recorded leader

    def __init__(self, settings: Settings, ledger: Ledger, queue: Queue, clock: Callable[[], float] = time.time):
        self.settings, self.ledger, self.queue, self.clock = settings, ledger, queue, clock
        self.store_url = DataStore(settings.resolved_store()).url
        now = clock()
        self.me = new_leader(now)
        # Leases could not be renewed while no orchestrator ran: honour them for one more lease.
        self.grace_until = now + settings.lease_s
        self.last_enqueued: dict[str, float] = {}
        self._next_maintain = 0.0
        self._next_rescan = 0.0
        self.active: dict[str, Job] = {}  # queued and running jobs, as last written by this orchestrator
        self._init_blocks()
        self._handlers: dict[str, Callable[[dict], Reply]] = {
            "submit": self.on_submit, "claim": self.on_claim, "heartbeat": self.on_heartbeat,
            "progress": self.on_progress, "finish": self.on_finish, "cancel": self.on_cancel,
            "register": self.on_register, "drain": self.on_drain, "bye": self.on_bye,
            "next_block": self.on_next_block, "block_done": self.on_block_done,
            "block_failed": self.on_block_failed, "block_release": self.on_block_release,
        }

    # -- the loop -------------------------------------------------------------------------------
    def lead(self) -> None:
        """Take leadership of the ledger, or raise NotLeader once the recorded leader is seen alive.

        A live leader's heartbeat counter advances within about a second; one whose counter stands still
        for a full lease of this machine's clock (its host crashed, or lost the ledger) is taken over.
        """
        since, told = time.monotonic(), False
        while not self.ledger.claim_leadership(self.me, self.settings.lease_s, time.monotonic()):
            cur = self.ledger.leader()
            who = f"pid {cur[0].pid} on {cur[0].hostname}" if cur else "another process"
            if self.ledger.watch.verdict is Verdict.ALIVE:
                raise NotLeader(f"an orchestrator is already running ({who}); use it, or stop it first")
            if not told and time.monotonic() - since > 3.0:  # a live one shows itself within a second or two
                log.info("the orchestrator on record (%s) is silent; it is taken over once silent for %.0fs", who,
                         self.settings.lease_s)
                told = True
            time.sleep(self.WATCH_LEADER_EVERY_S)

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
        if not self.ledger.renew_leadership(self.me):
            raise NotLeader("lost orchestrator leadership to another process")
        if time.monotonic() >= self._next_rescan:  # the index is rebuilt from the ledger now and then
            jobs = self.ledger.active_jobs()  # no ended job's record is read
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
            if msg.get("epochs_total") and (job.epochs_total is None or int(msg["epochs_total"]) > job.epochs_total):
                job.epochs_total = int(msg["epochs_total"])  # grows when training re-fits it to the budget
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
        """Record how attempt ``token`` ended and apply the policy's decision: succeed, requeue or fail."""
        msg = msg or {}
        decision: AfterAttempt | None = None

        def end(job: Job) -> None:
            nonlocal decision
            if self._reported_before(job, token, outcome):
                return  # the same report again (its first reply was lost): already applied
            att = self._holder(job, token, node)
            self._record_end(job, att, outcome, now, msg)
            decision = after_attempt(job, outcome, max_attempts=self.settings.max_attempts,
                                     max_node_losses=self.settings.max_node_losses,
                                     permanent=bool(msg.get("permanent")))
            if decision.next is Next.SUCCEED:
                job.status, job.error = JobStatus.SUCCEEDED, None
                job.log(now, f"attempt {token} succeeded on node {att.node}")
                return
            if outcome is AttemptOutcome.ERRORED:
                job.log(now, f"attempt {token} failed on node {att.node}: {att.error}")
            else:
                job.log(now, note or f"attempt {token} {outcome.value} at epoch {job.epochs_done}")
            if decision.next is Next.FAIL:
                job.status, job.error = JobStatus.FAILED, decision.error
                job.log(now, f"failed: {job.error}")
            else:
                job.status, job.next_token = JobStatus.QUEUED, token + 1

        job = self._update(job_id, end)
        if decision is not None and decision.next is Next.REQUEUE:
            self._enqueue(job, now)
        return {"ok": True, "status": job.status.value}

    @staticmethod
    def _reported_before(job: Job, token: int, outcome: AttemptOutcome) -> bool:
        prior = next((a for a in job.attempts if a.token == token), None)
        return prior is not None and prior.outcome is outcome and job.status is not JobStatus.RUNNING

    def _record_end(self, job: Job, att: Attempt, outcome: AttemptOutcome, now: float, msg: dict) -> None:
        """Copy the report onto the attempt and the job; results outside the attempt's keys are refused."""
        att.outcome, att.ended_at, att.lease_expires_at = outcome, now, None
        att.timings.update(msg.get("timings") or {})
        if "epochs_done" in msg:
            att.epochs_done = job.epochs_done = int(msg["epochs_done"])
        for field in ("checkpoint", "model", "output"):
            uri = msg.get(field)
            if uri:
                if not self._owned(uri, job.id, att.token):
                    raise StaleWrite(f"{field} {uri} is outside attempt {att.token}'s keys")
                setattr(job, field, uri)
        job.metrics.update(msg.get("metrics") or {})
        if msg.get("plan") and job.plan is None:
            job.plan = msg["plan"]
        if msg.get("epochs_total"):
            job.epochs_total = int(msg["epochs_total"])
        if outcome is AttemptOutcome.ERRORED:
            att.error = msg.get("error") or "unknown error"
        job.updated_at = now
