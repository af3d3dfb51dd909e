"""The orchestrator: the single writer of job state. Handles requests, reaps leases, rebuilds the queue.

A job's way through it: ``on_submit`` writes it QUEUED and sends a dispatch message; ``on_claim`` gives the
node a lease under a new attempt token; ``on_progress`` records checkpoints under that attempt's keys and
renews the lease; ``on_finish`` (or a lease that ``maintain`` finds expired) ends the attempt, and
``leases.after_attempt`` decides whether the job succeeds, is queued again or fails. The decisions live in
``leases.py`` as pure functions; this module carries them out against the ledger and the queue.

Requests arrive as the typed models of ``core/protocol.py``: ``accept`` checks a queued request's envelope
(no replay, no duplicate, not stale) and ``handle`` parses and applies it; node requests are in
nodeservice.py, block requests in blockservice.py.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from pydantic import BaseModel

from dlorch.core import protocol
from dlorch.core.errors import DlorchError, StaleWrite, one_line
from dlorch.core.protocol import (Cancel, CancelReply, Claim, ClaimReply, Finish, FinishReply, Progress, Register,
                                  Reply, Submit, SubmitReply, refusal)
from dlorch.core.settings import Settings
from dlorch.core.store import DataStore
from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobStatus, NodeInfo, new_job_id
from dlorch.orchestrator.leadership import Verdict, new_leader
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.blockservice import BlockHandlers
from dlorch.orchestrator.leases import AfterAttempt, Next, after_attempt, missing_from_queue, owned_by
from dlorch.orchestrator.leasetable import LeaseTable
from dlorch.orchestrator.nodeservice import NodeHandlers
from dlorch.orchestrator.replay import Refused, ReplayGuard
from dlorch.orchestrator.rescan import Rescan
from dlorch.orchestrator.queue import Queue

log = logging.getLogger("dlorch.orchestrator")


def _request_key(message: dict[str, Any]) -> tuple[str, str]:
    """A queued request's (sender, request id) as it claims them (checked when it is handled)."""
    return str(message.get("sender")), str(message.get("rid"))


class NotLeader(DlorchError):
    """Another orchestrator is alive on this ledger."""


class Orchestrator(NodeHandlers, BlockHandlers):
    """Applies requests to the ledger (compare-and-set) and keeps the queue in line with it."""

    MAINTAIN_EVERY_S = 1.0
    REQUEUE_MIN_AGE_S = 5.0
    REQUEUE_CHECK_EVERY_S = 5.0  # how often the jobs channel is read for queued jobs whose message was lost
    RESCAN_EVERY_S = 30.0  # full ledger scan; between scans, maintenance uses the in-memory index
    RESCAN_BUDGET_S = 0.1  # of each maintenance pass spent reading the scan's records (rescan.py)
    READ_AHEAD = 5000  # requests read from the queue and held in memory, heartbeats answered first (step)
    REQUESTS_BUDGET_S = 0.25  # of each step spent on the requests other than heartbeats
    REPLY_DELAY_S = 0.01  # how long a reply may wait to be posted with others (one Redis round trip for many)
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
        self._next_requeue_check = float("-inf")  # maintain's clock
        self._rescan: Rescan | None = None
        # Requests read, not yet handled, by (sender, request id), in the order read (step)
        self._read: dict[tuple[str, str], dict[str, Any]] = {}
        self._outbox: list[tuple[float, tuple[str, dict[str, Any]]]] | None = None  # replies to post (step)
        self.active: dict[str, Job] = {}  # queued and running jobs, as last written by this orchestrator
        self._top_queued: float | None = None  # top_queued_priority, None until worked out again
        # Node heartbeats and attempt leases in memory, flushed to the ledger when due (leasetable.py).
        self.leasetable = LeaseTable(lease_s=settings.lease_s)
        self.node_infos: dict[str, NodeInfo] = {}  # node records as their newest heartbeat left them
        self.sent_at: float | None = None  # the send time of the queued request being handled
        self._init_blocks()
        self.guard = ReplayGuard()  # the queued requests seen lately: replays and duplicates refused
        self._soon: collections.deque[Callable[[], Any]] = collections.deque()  # other threads' calls (call_soon)
        self._handlers: dict[str, Callable[[Any], Reply]] = {
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
        """One iteration: handle waiting requests (waiting up to ``timeout`` for the first), maintain.

        Heartbeats are answered as they are read, ahead of the other requests read with them, which wait
        in memory (``_read``) and are handled for up to ``REQUESTS_BUDGET_S`` a step: a thousand agents
        registering and claiming on a slow ledger (S3) take minutes, and the heartbeats of those already
        working must not queue behind them past a lease. A node's heartbeat naming a job only follows the
        reply to its claim, so no heartbeat overtakes what it depends on. What waits in memory when the
        orchestrator stops is sent again by its senders (every request is re-sent until answered); so is a
        request read beyond ``READ_AHEAD``. A copy re-sent while the request waits here takes its place
        (the newer stamp: a request that waited longer than ``protocol.FRESH_S`` is not refused as stale).
        """
        handled, events = 0, self.queue.events
        self._outbox = []  # replies are posted together (put_replies): one Redis round trip for many
        try:
            batch = events.receive_waiting(max_events)  # all that waits, in one read
            if not batch and not self._read and timeout > 0:  # nothing: wait for the next (those sent with it
                batch = [m] if (m := events.receive(timeout=timeout)) is not None else []  # are the next step's)
            for msg in batch:
                if msg.get("type") == "heartbeat":  # cheap, and a lease hangs on it
                    self.accept(msg)
                    handled += 1
                elif (key := _request_key(msg)) in self._read:  # a copy sent again: its newer stamp stays fresh
                    self._read[key] = msg
                elif len(self._read) < self.READ_AHEAD:
                    self._read[key] = msg
            self._post_replies()
            until = time.monotonic() + self.REQUESTS_BUDGET_S
            while self._read:
                msg = self._read.pop(next(iter(self._read)))  # the oldest, as its newest copy
                self.accept(msg)
                handled += 1
                self._post_replies(older_than=self.REPLY_DELAY_S)
                if time.monotonic() >= until:  # their share of the step, even when maintenance is due: a
                    break  # flood of heartbeats must not starve block pulls and claims
            self._post_replies()
        finally:  # replies not posted (the queue went away) are posted again for their senders' copies
            self._outbox = None
        while self._soon:
            fn = self._soon.popleft()
            try:
                fn()
            except DlorchError as e:
                log.warning("%s", e)
        if time.monotonic() >= self._next_maintain:
            self.maintain(self.clock())
            self._next_maintain = time.monotonic() + self.MAINTAIN_EVERY_S
        return handled

    def _post_replies(self, older_than: float = 0.0) -> None:
        """Post the replies waiting in the outbox, if the first has waited ``older_than`` seconds."""
        if self._outbox and time.monotonic() - self._outbox[0][0] >= older_than:
            replies, self._outbox = [r for _, r in self._outbox], []
            self.queue.events.put_replies(replies)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the orchestrator's own thread at its next step (the fleet controller's drains), so
        that the records it writes keep one writer. Thread-safe."""
        self._soon.append(fn)

    def fleet_view(self) -> tuple[list[Job], list[NodeInfo], list[dict[str, Any]]]:
        """Copies of the active jobs, the node records as their newest heartbeats left them, and each
        blockwise job's blocks left and holders, for another thread (the fleet controller). Thread-safe: a
        dict copy is atomic, and job records are replaced, not changed; node records are copied here."""
        jobs = list(self.active.copy().values())
        nodes = [n.model_copy() for n in self.node_infos.copy().values()]
        blocks = [{"job": b.job_id, "priority": b.priority, "created_at": b.created_at,
                   "left": b.total - len(b.done), "holders": sorted({lease.node for lease in b.leases.copy().values()})}
                  for b in list(self.books.copy().values())]
        return jobs, nodes, blocks

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

    def accept(self, message: dict[str, Any]) -> None:
        """Apply a request taken from the queue, once, and post its reply unless it is one-way.

        Its envelope is checked first (``replay.ReplayGuard``): a duplicate is not applied again (the
        reply kept from the first time is posted again, if any), a stale or superseded one is refused
        (a stale one with ``resend``: its sender's clock offset was off). Every reply carries this
        orchestrator's ``now``, from which senders learn the offset of their clocks.
        """
        try:
            env, body = protocol.split_envelope(message)
        except protocol.Invalid as e:  # no request id to answer: nobody waits for it
            log.warning("dropped a request: %s", e)
            return
        refused = self.guard.check(env, body.get("type"), self.clock())
        if refused is Refused.DUPLICATE:
            reply = self.guard.reply_to(env)
            if reply is None:
                return
        elif refused is not None:
            log.info("refused a request of %s: %s", env.sender, refused.value)
            reply = {**refusal(f"request refused: {refused.value}").wire(),
                     protocol.RESEND: refused is Refused.STALE}
        else:
            self.leasetable.saw(min(env.sent_at, self.clock()))
            self.sent_at = env.sent_at
            try:
                reply = self.handle(body, sender=env.sender)
            finally:
                self.sent_at = None
            self.guard.keep_reply(env, reply)
        if env.oneway:
            return
        reply = {**reply, protocol.NOW: self.clock()}
        if self._outbox is None:
            self.queue.events.put_reply(env.rid, reply)
        else:  # posted with the others of the step (step)
            self._outbox.append((time.monotonic(), (env.rid, reply)))

    def handle(self, request: dict[str, Any] | BaseModel, sender: str | None = None) -> dict[str, Any]:
        """Apply one request and return its reply as JSON; whatever the request, nothing is raised.

        ``request`` is a protocol request or its JSON (no envelope): a client acting as the orchestrator
        for one request calls this directly; queued requests come through ``accept``, which names their
        ``sender``, the only node whose own requests (claim, progress, ...) they may be.
        """
        try:
            req = request if isinstance(request, BaseModel) else protocol.parse_request(request)
        except protocol.Invalid as e:
            return refusal(str(e)).wire()
        node = req.node if isinstance(req, (protocol.NodeRequest, Register)) else None
        if sender is not None and node is not None and node != sender:
            return refusal(f"a {req.type} request of node {node} sent by {sender}: refused").wire()
        try:
            reply = self._handlers[req.type](req)
        except (StaleWrite, DlorchError) as e:
            reply = refusal(one_line(e))
        except Exception as e:  # a bad request must never take the orchestrator down
            log.exception("request %s failed", req.type)
            reply = refusal(f"{type(e).__name__}: {one_line(e)}")
        return reply.wire()

    def maintain(self, now: float) -> None:
        """Renew leadership, requeue expired leases, put missing jobs back in the queue."""
        self.me.heartbeat_at = now
        if not self.ledger.renew_leadership(self.me):
            raise NotLeader("lost orchestrator leadership to another process")
        if self._rescan is None and time.monotonic() >= self._next_rescan:  # the index is rebuilt now and then
            self._rescan = Rescan(self.ledger.scan_active())  # no ended job's record is read
        if self._rescan is not None and self._rescan.step(self.RESCAN_BUDGET_S):  # a few records a pass
            scan, self._rescan = self._rescan, None
            jobs = scan.fresh()  # what this orchestrator wrote meanwhile is newer than what the scan read
            self.active = {**{j.id: j for j in jobs if j.status is not JobStatus.WAITING},
                           **{i: j for i, j in self.active.items() if i in scan.touched}}
            self._top_queued = None
            self.sync_leases()
            for job in jobs:
                if job.status is JobStatus.WAITING and job.id not in self.books:
                    self._load_book(job, now)
            self._next_rescan = time.monotonic() + self.RESCAN_EVERY_S
        self._maintain_blocks(now)
        active = list(self.active.values())
        expired = self.lapsed_leases(now)
        for exp in expired:
            self._end_attempt(exp.job_id, exp.token, AttemptOutcome.EXPIRED, now,
                              note=f"lease of node {exp.node} expired")
        requeued = {e.job_id for e in expired}  # just enqueued by _end_attempt
        queued = [j for j in active if j.status is JobStatus.QUEUED and j.id not in requeued]
        if queued and now >= self._next_requeue_check:  # reads (and verifies) every queued message
            self._next_requeue_check = now + self.REQUEUE_CHECK_EVERY_S
            messages = [d.wire() for m in self.queue.jobs.items() if (d := protocol.parse_dispatch(m, quiet=True))]
            for job in missing_from_queue(queued, messages, self.last_enqueued, now, self.REQUEUE_MIN_AGE_S):
                log.info("job %s missing from the queue; enqueued again", job.id)
                self._enqueue(job, now)

    # -- requests ---------------------------------------------------------------------------------
    def on_submit(self, req: Submit) -> Reply:
        spec = req.spec.check()
        now = self.clock()
        job = Job(id=req.job_id or new_job_id(now), spec=spec, created_at=now, updated_at=now,
                  epochs_total=spec.epochs if spec.trains else None)
        job.log(now, f"submitted: {spec.kind} (priority {spec.priority})")
        try:
            self._create(job)
        except StaleWrite:  # a re-sent submit is the same job, not a second one
            return SubmitReply(job=job.id)
        self._enqueue(job, now)
        return SubmitReply(job=job.id)

    def on_claim(self, req: Claim) -> Reply:
        now = self.clock()
        node, token = req.node, req.token

        def held(job: Job | None) -> bool:  # the same claim again (its reply was lost): the node holds it
            att = job.current if job is not None else None
            return att is not None and job.status is JobStatus.RUNNING and (att.token, att.node) == (token, node)

        if held(current := self.active.get(req.job)):
            return ClaimReply(job=current, lease_expires_at=current.current.lease_expires_at)

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

        try:
            job = self._update(req.job, claim, expect=[JobStatus.QUEUED])
        except StaleWrite:  # e.g. claimed before a restart of this orchestrator: the ledger says if it is this claim
            if not held(current := self.ledger.get(req.job)):
                raise
            return ClaimReply(job=current, lease_expires_at=current.current.lease_expires_at)
        self.last_enqueued.pop(job.id, None)
        return ClaimReply(job=job, lease_expires_at=now + self.settings.lease_s)

    def on_progress(self, req: Progress) -> Reply:
        """Record an epoch's checkpoint, or a fall-back to an older one; progress only ever moves forward.

        A report older than what the attempt already reported (a late copy, a replay) changes nothing, and
        a fall-back is taken only before the attempt made progress (it is the attempt's first report).
        """
        now = self.clock()
        token, ckpt, resumed = req.token, req.checkpoint, req.resumed_from

        def progress(job: Job) -> None:
            att = self._holder(job, token, req.node)
            if resumed is not None:  # the attempt fell back to an older checkpoint (the newer was unreadable)
                if att.epochs_done != att.epochs_start:
                    raise StaleWrite(f"attempt {token} made progress already; a fall-back now is a replay")
                if resumed and resumed not in {uri for _, uri in job.checkpoints}:
                    raise StaleWrite(f"{resumed} is not a checkpoint this job accepted")
                att.resumed_from, att.epochs_start = resumed or None, req.epochs_done
                job.checkpoints = [(e, u) for e, u in job.checkpoints if e <= req.epochs_done]
                job.checkpoint = resumed or None
                job.log(now, f"attempt {token} resumed from epoch {req.epochs_done} ({req.why})")
            elif req.epochs_done < att.epochs_done:
                return  # older than what is recorded: a late copy or a replay, never a step back
            elif ckpt and not self._owned(ckpt, job.id, token):
                raise StaleWrite(f"checkpoint {ckpt} is outside attempt {token}'s keys")
            att.epochs_done = job.epochs_done = req.epochs_done
            att.lease_expires_at = now + self.settings.lease_s
            if req.epochs_total and (job.epochs_total is None or req.epochs_total > job.epochs_total):
                job.epochs_total = req.epochs_total  # grows when training re-fits it to the budget
            if req.plan and job.plan is None:
                job.plan = req.plan
            if ckpt and resumed is None:
                job.checkpoint = ckpt
                job.checkpoints = [*job.checkpoints, (att.epochs_done, ckpt)][-self.KEEP_CHECKPOINTS:]
            job.metrics.update(req.metrics)
            if req.metrics and resumed is None:
                job.record_epoch(req.epochs_done, req.metrics)
            job.updated_at = now

        self._update(req.job, progress, expect=[JobStatus.RUNNING])
        return Reply()

    def on_finish(self, req: Finish) -> Reply:
        if req.outcome is AttemptOutcome.SPLIT:
            return self._split(req)
        return self._end_attempt(req.job, req.token, req.outcome, self.clock(), node=req.node, report=req)

    def on_cancel(self, req: Cancel) -> Reply:
        now = self.clock()

        def cancel(job: Job) -> None:
            if job.status.is_terminal():
                raise StaleWrite(f"job {job.id} already {job.status.value}")
            if job.current and job.current.outcome is AttemptOutcome.RUNNING:
                job.current.outcome, job.current.ended_at = AttemptOutcome.CANCELLED, now
            job.status, job.cancel_requested, job.updated_at = JobStatus.CANCELLED, True, now
            job.log(now, "cancelled by the user")

        job = self._update(self.ledger.resolve(req.job), cancel)
        self._drop_book(job.id)  # its queued dispatch messages find no blocks and are dropped
        return CancelReply(job=job.id)

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
        if self._rescan is not None:
            self._rescan.wrote(job.id)
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            self.active[job.id] = job
        else:
            self.active.pop(job.id, None)
        self._top_queued = None
        self.track_lease(job)

    def _enqueue(self, job: Job, now: float) -> None:
        dispatch = protocol.Dispatch(job=job.id, token=job.next_token, kind=job.spec.kind, priority=job.spec.priority)
        self.queue.jobs.send(dispatch.wire(), priority=job.spec.priority)
        self.last_enqueued[job.id] = now

    def _holder(self, job: Job, token: int, node: str | None) -> Attempt:
        """The attempt if it holds the lease, else StaleWrite (fencing)."""
        att = job.current
        if job.status is not JobStatus.RUNNING or att is None or att.token != token or (node and att.node != node):
            raise StaleWrite(f"attempt {token} of job {job.id} does not hold the lease")
        return att

    def _owned(self, uri: str, job_id: str, token: int) -> bool:
        """Whether ``uri`` lies under attempt ``token``'s own keys in this deployment's store."""
        return owned_by(uri, f"{self.store_url}/jobs/{job_id}/attempts/{token}")

    def _end_attempt(self, job_id: str, token: int, outcome: AttemptOutcome, now: float,
                     node: str | None = None, report: Finish | None = None, note: str = "") -> Reply:
        """Record how attempt ``token`` ended and apply the policy's decision: succeed, requeue or fail."""
        decision: AfterAttempt | None = None

        def end(job: Job) -> None:
            nonlocal decision
            if self._reported_before(job, token, outcome):
                return  # the same report again (its first reply was lost): already applied
            att = self._holder(job, token, node)
            self._record_end(job, att, outcome, now, report)
            decision = after_attempt(job, outcome, max_attempts=self.settings.max_attempts,
                                     max_node_losses=self.settings.max_node_losses,
                                     permanent=bool(report and report.permanent))
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
        return FinishReply(status=job.status)

    @staticmethod
    def _reported_before(job: Job, token: int, outcome: AttemptOutcome) -> bool:
        prior = next((a for a in job.attempts if a.token == token), None)
        return prior is not None and prior.outcome is outcome and job.status is not JobStatus.RUNNING

    def _record_end(self, job: Job, att: Attempt, outcome: AttemptOutcome, now: float,
                    report: Finish | None) -> None:
        """Copy the report onto the attempt and the job; results outside the attempt's keys are refused."""
        att.outcome, att.ended_at, att.lease_expires_at = outcome, now, None
        job.updated_at = now
        if report is None:  # the orchestrator's own record (a lease that expired)
            return
        att.timings.update(report.timings)
        if report.epochs_done is not None:  # never fewer than its checkpoints said: they are the resume point
            att.epochs_done = job.epochs_done = max(report.epochs_done, att.epochs_done)
        for field in ("checkpoint", "model", "output", "confidence"):
            uri = getattr(report, field)
            if uri:
                if not self._owned(uri, job.id, att.token):
                    raise StaleWrite(f"{field} {uri} is outside attempt {att.token}'s keys")
                setattr(job, field, uri)
        job.metrics.update(report.metrics)
        if report.plan and job.plan is None:
            job.plan = report.plan
        if report.epochs_total:
            job.epochs_total = report.epochs_total
        if outcome is AttemptOutcome.ERRORED:
            att.error = report.error or "unknown error"
