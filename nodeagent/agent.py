"""A node agent: register, heartbeat, take one job at a time from the queue, run it, report.

Everything it sends and receives is a model of ``core/protocol.py``; a message or reply that is not one
is logged and dropped, so junk on the queue never ends the agent or its heartbeat.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dlorch.core import protocol
from dlorch.core.errors import DlorchError, RedactSecrets, Unreachable
from dlorch.core.protocol import (Bye, Claim, ClaimReply, Dispatch, Finish, Heartbeat, HeartbeatReply, Progress,
                                  Register)
from dlorch.core.settings import Settings
from dlorch.core.spec import Job, check_id
from dlorch.core.store import DataStore
from dlorch.core.wire import Signer
from dlorch.nodeagent import hardware, reports
from dlorch.nodeagent.attempt import Attempt
from dlorch.nodeagent.blockwise import BlockWorker
from dlorch.nodeagent.interrupts import SpotNoticePoller, StopFlag
from dlorch.nodeagent.nodecache import trim_cache
from dlorch.orchestrator.queue import Queue

log = logging.getLogger("dlorch.agent")

DRAIN = "drain requested"  # the stop reason of `dlorch nodes drain`


class Agent:
    """One node's loop. ``step()`` takes and runs at most one job; ``run()`` loops it until stopped."""

    FINISH_RETRY_S = 600.0
    STOPPING_WAIT_S = 5.0  # once stopping, how long one wait for the orchestrator may last

    def __init__(self, settings: Settings, node_id: str | None = None, workdir: Path | None = None,
                 spot_metadata_url: str | None = None) -> None:
        self.settings, self.spot_metadata_url = settings, spot_metadata_url
        self.node_id = check_id("node", node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        signer = Signer(settings.resolved_secret())
        self.store = DataStore(settings.resolved_store(), allow=settings.allowed_urls())  # nothing else is touched
        self.queue = Queue(settings.resolved_queue(), signer, sender=self.node_id)
        self._hb_queue = Queue(settings.resolved_queue(), signer, sender=self.node_id)  # its own connection
        self._side_queue = Queue(settings.resolved_queue(), signer, sender=self.node_id)  # the block prefetch's
        base = workdir or (self.store.local_root or Path.home() / ".dlorch") / "agents" / self.node_id
        self.workdir, self.cache = base / "work", base.parent.parent / "cache"
        self.stop = StopFlag()
        self.lease_lost = StopFlag()
        self.current: tuple[str, int] | None = None
        self._hb_thread: threading.Thread | None = None
        self._hb_done = threading.Event()
        self.blocks: BlockWorker | None = None  # created on the first blockwise job this node joins
        self.handed_back = False  # a stop came while this node held work, which went back to the queue

    # -- lifecycle --------------------------------------------------------------------------------
    def register(self) -> None:
        """Announce this node and its hardware to the orchestrator."""
        reply = self.queue.request(self._registration(), timeout=60, stop=self.stop)
        if not reply.get("ok"):
            raise DlorchError(f"registration refused: {reply.get('reason')}")
        log.info("node %s registered", self.node_id)

    def run(self) -> None:
        """Register, start heartbeating, loop ``step`` until a stop is asked for, then say goodbye."""
        try:
            self.register()
        except Unreachable:
            if self.stop.is_set():  # asked to stop before any orchestrator answered: nothing to hand back
                log.info("node %s stopped before registering (%s)", self.node_id, self.stop.reason)
                return
            raise
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()
        # Import the engine before taking work, so a node's first block or epoch does not pay for it.
        # Here, not in a thread beside the attempt: MONAI's package import is not safe to run twice at once.
        _warm_up()
        if self.spot_metadata_url:
            poller = SpotNoticePoller(self.stop, self.spot_metadata_url, every_s=min(5.0, self.settings.heartbeat_s))
            threading.Thread(target=poller.run, args=(self._hb_done,), name="spot-notice", daemon=True).start()
        try:
            while self.step():
                pass
        finally:
            self._hb_done.set()
            if self.blocks is not None:
                self.blocks.close()
            try:
                self.queue.request(Bye(node=self.node_id), timeout=5)
            except DlorchError:
                pass
            log.info("node %s stopped (%s)", self.node_id, self.stop.reason)

    def work_left(self) -> bool:
        """Whether the agent stopped with work in hand that it gave back, for a run that may take it up again:
        a job handed back, or blocks left, on a signal or spot notice (a drain means: leave, do not come back)."""
        return self.handed_back and self.stop.reason != DRAIN

    def step(self) -> bool:
        """Take one job from the queue and run it to its end or hand-back. False when the agent should exit."""
        if self.stop.is_set():
            return False
        try:
            msg = self.queue.jobs.receive(timeout=1.0)
        except Unreachable as e:
            log.warning("%s", e)
            self.stop.wait(2.0)
            return not self.stop.is_set()
        msg = protocol.parse_dispatch(msg) if msg is not None else None
        if msg is None:  # nothing came, or junk (logged)
            return not self.stop.is_set()
        if self.stop.is_set():  # stopping between dequeue and claim: put the message back, as urgent as it was
            self.queue.jobs.send(msg.wire(), priority=msg.priority)
            return False
        trim_cache(self.cache, int(self.settings.cache_gb * 2**30))  # before this job's inputs add to it
        if msg.kind == "blocks":  # a blockwise job: pull its blocks until none is left
            if self.blocks is None:
                self.blocks = BlockWorker(self.node_id, self.store, self.cache, self.queue, self._side_queue, self.stop)
            ran = self.blocks.run(msg.job)
            if ran:
                log.info("ran %d blocks (from %s)", ran, msg.job)
            if self.stop.is_set():  # stopped among the blocks: those not done are other nodes' (or a later run's)
                self.handed_back = True
            return not self.stop.is_set()
        job = self._claim(msg)
        if job is None:
            return True
        token = msg.token
        log.info("running %s attempt %d (%s)", job.id, token, job.spec.kind)
        self.lease_lost = StopFlag()
        self.current = (job.id, token)
        log_file = self.workdir / f"{job.id}-{token}.log"
        handler = _attach_log(log_file)
        try:
            attempt = Attempt(job, token, self.store, self._reporter(job.id, token), self.stop,
                              self.lease_lost, self.workdir / f"{job.id}-{token}", self.cache)
            body = _run_off_main_thread(attempt)
        finally:
            self.current = None
            logging.getLogger("dlorch").removeHandler(handler)
            handler.close()
        try:  # the attempt's own log, beside its other attempt-scoped objects
            self.store.put_file(log_file, f"jobs/{job.id}/attempts/{token}/log.txt")
            log_file.unlink()
        except (DlorchError, OSError) as e:
            log.warning("could not upload the attempt log: %s", e)
        if not self.lease_lost.is_set():
            self._finish(job.id, token, body)
        if body.get("outcome") == "handed_back":
            self.handed_back = True
        return not self.stop.is_set()

    # -- talking to the orchestrator ----------------------------------------------------------------
    def _registration(self) -> Register:
        return reports.report(Register, {"node_info": hardware.describe(self.node_id)})

    def _claim(self, msg: Dispatch) -> Job | None:
        """Claim a dispatched attempt: the job, or None if it is not ours to run (a duplicate, stale)."""
        raw = self._request(Claim(job=msg.job, token=msg.token, node=self.node_id))
        unreachable = raw.get("unreachable")  # the orchestrator re-dispatches a job whose message is gone
        reply = ClaimReply(ok=False, reason=raw["reason"]) if unreachable else protocol.parse_reply(ClaimReply, raw)
        if not reply.ok or reply.job is None:
            log.info("skipped %s attempt %s: %s", msg.job, msg.token, reply.reason)
            return None
        return reply.job

    def _finish(self, job_id: str, token: int, body: dict[str, Any]) -> None:
        """Report how the attempt ended. The result is only safe once recorded: keep asking through a
        queue outage, up to a while. A report that is not the protocol's (it cannot be) is sent as an error."""
        fields = {**body, "job": job_id, "token": token, "node": self.node_id}
        try:
            finish = reports.report(Finish, fields)
        except protocol.Invalid as e:
            log.error("%s", e)
            finish = Finish(job=job_id, token=token, node=self.node_id, outcome="errored", error=str(e))
        deadline = time.monotonic() + self.FINISH_RETRY_S
        while True:
            reply = self._request(finish, timeout=30)
            if not reply.get("unreachable") or self.stop.is_set() or time.monotonic() > deadline:
                break  # a stopping agent tries once: its lease runs out and the job is queued again
        log.info("%s attempt %d %s (orchestrator: %s)", job_id, token, finish.outcome.value,
                 reply.get("status") or reply.get("reason"))

    def _request(self, message: BaseModel, timeout: float = 30.0) -> dict[str, Any]:
        try:
            return self.queue.request(message, timeout=timeout, stop=self.stop.bounded(self.STOPPING_WAIT_S))
        except Unreachable as e:
            log.warning("%s", e)
            return {"ok": False, "unreachable": True, "reason": str(e)}

    def _reporter(self, job_id: str, token: int):
        def report(body: dict[str, Any]) -> dict[str, Any]:
            """The attempt's progress reports; one that is not the protocol's is logged and not sent."""
            try:
                progress = reports.report(Progress, {**{k: v for k, v in body.items() if k != "type"},
                                                      "job": job_id, "token": token, "node": self.node_id})
            except protocol.Invalid as e:
                log.error("%s", e)
                return {"ok": False, "unreachable": True, "reason": str(e)}  # not the lease's fault: go on
            return self._request(progress, timeout=60)

        return report

    def _heartbeat_loop(self) -> None:
        while not self._hb_done.wait(self.settings.heartbeat_s):
            try:
                self.heartbeat_once()
            except Exception:  # never let the thread die: without heartbeats every lease of this node ends
                log.exception("heartbeat failed; the next one follows")

    def heartbeat_once(self) -> None:
        """Renew this node's liveness and its lease; learn about drains, cancels and lost leases."""
        current = self.current
        msg = Heartbeat(node=self.node_id)
        if current:
            msg.job, msg.token = current
        held = self.blocks.holding() if self.blocks is not None else []
        if held:
            msg.blocks = [tuple(h) for h in held]
            msg.job = msg.job or held[0][0]
        try:
            raw = self._hb_queue.request(msg, timeout=max(2.0, self.settings.heartbeat_s * 2))
        except Unreachable as e:
            log.warning("heartbeat: %s", e)
            return
        reply = protocol.parse_reply(HeartbeatReply, raw)
        if reply.register_again:
            try:
                self._hb_queue.request(self._registration())
            except Unreachable:
                pass
        if reply.drain:
            self.stop.set(DRAIN)
        for job_id in reply.jobs_gone:
            if self.blocks is not None:
                self.blocks.lost.add(job_id)
        if current and reply.lease is False and self.current == current:
            self.lease_lost.set(f"lease on {current[0]} attempt {current[1]} lost")


def _warm_up() -> None:
    try:
        import dlorch.core.engine.segment  # noqa: F401  (torch, MONAI, the networks)
    except Exception as e:  # the job that needs it will report the real error
        log.debug("engine warm-up failed: %s", e)


def _attach_log(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactSecrets())  # this log is uploaded beside the job: no credentials in it
    logging.getLogger("dlorch").addHandler(handler)
    return handler


def _run_off_main_thread(attempt: Attempt) -> dict[str, Any]:
    """Run an attempt in a worker thread while the main thread keeps the signals.

    Lightning installs its own SIGTERM handler when it trains on the main thread and then aborts
    the epoch with an exception; the agent's contract is to finish the epoch, checkpoint and hand
    back. Off the main thread, Lightning leaves signals alone and the agent's stop flag rules.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        result["body"] = attempt.run()

    thread = threading.Thread(target=work, name=f"attempt-{attempt.job.id}-{attempt.token}")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a bounded wait, so that signal handlers run promptly
    return result.get("body") or {"outcome": "errored", "error": "the attempt thread died unexpectedly"}
