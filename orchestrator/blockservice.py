"""The orchestrator's blockwise protocol: split a job into blocks, lease them to nodes, fold their reports.

A mixin of ``Orchestrator`` (service.py), which supplies the ledger, the queue, the settings,
the clock and ``_update`` / ``_holder``. Block leases live in memory (blockbook.py, pure); the
done set is flushed to the parent job's record about once a second, and a lost flush only
means an idempotent block is computed again. Requests arrive typed (``core/protocol.py``).
"""

from __future__ import annotations

import logging
import time

from dlorch.core.blocks import Block
from dlorch.core.errors import StaleWrite
from dlorch.core.protocol import (BlockContext, BlockDone, BlockFailed, BlockGeometry, BlockRelease, Dispatch, Finish,
                                  FinishReply, NextBlock, NextBlockReply, Reply, refusal)
from dlorch.core.spec import AttemptOutcome, Job, JobStatus
from dlorch.orchestrator.blockbook import BlockBook, choose_book

log = logging.getLogger("dlorch.orchestrator")


class BlockHandlers:
    """Block requests and reports, and the block part of maintenance."""

    FLUSH_BLOCKS_EVERY_S = 1.0  # how often a blockwise job's done set is written to the ledger
    BLOCK_TOKENS = 64  # dispatch messages per blockwise job: up to this many nodes join it from the queue

    def _init_blocks(self) -> None:
        # Blockwise jobs (WAITING): block leases in memory, the done set flushed to the ledger (blockbook.py).
        self.books: dict[str, BlockBook] = {}
        self.block_geometry: dict[str, list[dict]] = {}
        self.block_context: dict[str, dict] = {}
        self._tokens_sent: dict[str, float] = {}
        self._flushed_at: dict[str, float] = {}

    def _split(self, req: Finish) -> Reply:
        """A planner attempt cut a blockwise job into blocks: record the plan, then hand blocks out.

        A planner that no longer holds the lease (paused past it; a newer attempt may have split
        the job already) is refused before anything is recorded.
        """
        now, token, node = self.clock(), req.token, req.node
        if not req.blocks or req.output is None or [b.index for b in req.blocks] != list(range(len(req.blocks))):
            return refusal("a split names its output and lists its blocks in order, from index 0")
        blocks = [b.model_dump(mode="json") for b in req.blocks]
        job = self.ledger.get(req.job)
        self._holder(job, token, node)
        if req.output not in (job.spec.output, f"{self.store_url}/jobs/{job.id}/output.zarr"):
            raise StaleWrite(f"output {req.output} is not this job's")
        # The plan first: a WAITING job always has one to rebuild its book from. ``split`` is the
        # planner's token, which its output's stamp names: blocks write only into that array.
        plan = {"blocks": blocks, "split": token, "norm": req.norm, "priors": req.priors, "noise_var": req.noise_var}
        self.ledger.put_block_plan(job.id, plan)

        def split(job: Job) -> None:
            att = self._holder(job, token, node)
            att.outcome, att.ended_at, att.lease_expires_at = AttemptOutcome.SPLIT, now, None
            att.timings.update(req.timings)
            job.status, job.output, job.updated_at = JobStatus.WAITING, req.output, now
            job.blocks = {"total": len(blocks), "done": 0, "by_node": {}, "voxels_total": req.voxels,
                          "voxels_done": 0, "started_at": now, "timings": {}, "done_ranges": [], "errors": {}}
            job.log(now, f"split into {len(blocks)} blocks by node {node}")

        parent = self._update(req.job, split, expect=[JobStatus.RUNNING])
        self._load_book(parent, now, plan)
        self._send_block_tokens(parent.id, len(blocks), now)
        return FinishReply(status=parent.status)

    def _load_book(self, job: Job, now: float, plan: dict | None = None) -> BlockBook | None:
        """Build the in-memory book of a WAITING job from its plan and recorded progress."""
        plan = plan or self.ledger.block_plan(job.id)
        if plan is None:
            log.warning("blockwise job %s has no block plan; failing it", job.id)
            self._fail_parent(job.id, "its block plan is missing from the ledger; submit it again", now)
            return None
        geometry = plan["blocks"]
        voxels = [Block(b["index"], b["core"], b["read"]).voxels for b in geometry]
        book = BlockBook.restore(job.id, job.spec.model or "", voxels, job.blocks or {},
                                 job.spec.max_attempts or self.settings.max_attempts, job.spec.priority,
                                 job.created_at, max_losses=self.settings.max_node_losses)
        self.books[job.id] = book
        self.block_geometry[job.id] = geometry
        self.block_context[job.id] = {"spec": job.spec.model_dump(mode="json"), "output": job.output,
                                      "norm": plan.get("norm"), "priors": plan.get("priors"),
                                      "noise_var": plan.get("noise_var"), "split": plan.get("split")}
        self._tokens_sent.setdefault(job.id, now)  # holders re-adopt their blocks by heartbeat first
        self._flushed_at[job.id] = now
        return book

    def _send_block_tokens(self, job_id: str, waiting: int, now: float) -> None:
        """Put dispatch messages for a blockwise job in the queue; a node that takes one pulls blocks."""
        book = self.books[job_id]
        for _ in range(min(waiting, self.BLOCK_TOKENS)):
            dispatch = Dispatch(job=job_id, token=0, kind="blocks", priority=book.priority)
            self.queue.jobs.send(dispatch.wire(), priority=book.priority)
        self._tokens_sent[job_id] = now

    def on_next_block(self, req: NextBlock) -> Reply:
        """Lease a block to a node: affinity to models it holds, then locality to its last block.

        The request carries the node's done reports since its last request (``done``): one round
        trip per block both reports and claims, where a separate report would cost a second message.
        """
        t0, c0 = time.perf_counter(), time.thread_time()
        reply = self._next_block(req)
        book = self.books.get(reply.job or "")
        if book is not None:  # the orchestrator's own time per block: the lease and the reports it carried
            _add_time(book.timings, "dispatch", t0, c0)
        return reply

    def _next_block(self, req: NextBlock) -> NextBlockReply:
        now, node = self.clock(), req.node
        for report in req.done:  # reported by this node, whatever the report says (checked as a BlockReport)
            self.on_block_done(BlockDone.model_construct(node=node, job=report.job, block=report.block,
                                                         timings=report.timings))
        self._book(req.job)  # the job the node asks about may not be loaded yet after a restart
        book = choose_book(list(self.books.values()), set(req.models), now, req.job)
        if book is None:
            return NextBlockReply(block=None)
        if self.top_queued_priority() > book.priority:
            # A more urgent job waits in the queue: send the node back to it (this job's dispatch
            # messages, re-sent by maintenance if need be, bring nodes back afterwards).
            return NextBlockReply(block=None)
        near = req.after if req.job == book.job_id else None
        index = book.pick(node, now, self.settings.lease_s, near=near)
        if index is None:
            return NextBlockReply(block=None)
        g = self.block_geometry[book.job_id][index]
        # Built unchecked (model_construct): the geometry was checked at the split, and a block costs little more
        reply = NextBlockReply.model_construct(job=book.job_id, block=BlockGeometry.model_construct(
            index=index, core=g["core"], read=g["read"]))
        if book.job_id not in req.have:
            reply.context = BlockContext.model_validate(self.block_context[book.job_id])
        return reply

    def top_queued_priority(self) -> float:
        """The highest priority of a queued job (-inf if none), worked out again only after a job is written
        (``_track``): every block request asks, and looking at thousands of active jobs costs more than a block."""
        if self._top_queued is None:
            self._top_queued = max((j.spec.priority for j in self.active.values() if j.status is JobStatus.QUEUED),
                                   default=float("-inf"))
        return self._top_queued

    def _book(self, job_id: str | None) -> BlockBook | None:
        """A blockwise job's book: in memory, or loaded from the ledger if the job is still WAITING.

        Reports and requests may arrive before the first rescan after a restart (they waited in the queue).
        """
        if not job_id:
            return None
        book = self.books.get(job_id)
        if book is None:
            job = self.ledger.find(job_id)
            if job is not None and job.status is JobStatus.WAITING:
                book = self._load_book(job, self.clock())
        return book

    def on_block_done(self, req: BlockDone) -> Reply:
        book = self._book(req.job)
        if book is None or req.block >= book.total:
            return refusal(f"job {req.job} has no block {req.block} in progress")
        book.finish(req.node, req.block, req.timings)
        if book.complete:
            self._flush_book(book, self.clock())
        return Reply()

    def on_block_failed(self, req: BlockFailed) -> Reply:
        book = self._book(req.job)
        if book is None or req.block >= book.total:
            return refusal(f"job {req.job} has no block {req.block} in progress")
        log.info("block %s of %s failed on %s: %s", req.block, book.job_id, req.node, req.error)
        if book.error(req.node, req.block, req.error, req.permanent):
            self._flush_book(book, self.clock())
        return Reply()

    def on_block_release(self, req: BlockRelease) -> Reply:
        book = self._book(req.job)
        if book is not None:
            book.release(req.node, req.block)
        return Reply()

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

        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            job = self._update(book.job_id, apply, expect=[JobStatus.WAITING])
        except StaleWrite as e:  # cancelled meanwhile
            log.info("%s", e)
            self._drop_book(book.job_id)
            return
        book.dirty = False
        _add_time(book.timings, "ledger_flush", t0, c0)
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


def _add_time(timings: dict[str, float], what: str, t0: float, c0: float) -> None:
    """Add wall seconds (``<what>_s``) and this thread's CPU seconds (``<what>_cpu_s``) since (t0, c0).

    Both, because on a machine whose cores the agents keep busy the wall time also counts the
    moments the orchestrator waits for a core (or for the disk in fsync); the CPU time is what
    it takes from the compute.
    """
    timings[f"{what}_s"] = timings.get(f"{what}_s", 0.0) + time.perf_counter() - t0
    timings[f"{what}_cpu_s"] = timings.get(f"{what}_cpu_s", 0.0) + time.thread_time() - c0
