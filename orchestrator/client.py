"""What the CLI does, as a library: submit, wait, cancel, read the ledger; start a local service if none runs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from dlorch.core.errors import DlorchError, Unreachable
from dlorch.core.protocol import Drain, Request, Submit
from dlorch.core.settings import Settings
from dlorch.core.spec import Job, new_job_id, parse_spec
from dlorch.core.store import DataStore
from dlorch.core.wire import Signer
from dlorch.orchestrator.leadership import Verdict
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import Orchestrator
from dlorch.orchestrator.statestore import open_state_store

log = logging.getLogger("dlorch.client")


class Client:
    """A connection to one dlorch deployment (store + queue)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = DataStore(settings.resolved_store())
        self.ledger = Ledger(open_state_store(settings.resolved_store()))
        self.signer = Signer(settings.resolved_secret())
        self.queue = Queue(settings.resolved_queue(), self.signer)

    def check_queue(self) -> None:
        """Fail with one line now, rather than later, if the queue cannot be reached."""
        self.queue.jobs.size()

    WATCH_LEADER_EVERY_S = 0.2  # how often a look at the leader record's heartbeat counter is taken

    def orchestrator_alive(self) -> bool:
        """Whether an orchestrator leads: its heartbeat counter advances (about once a second), or it is ours.

        No other host's clock is read: a record that looks live is watched until its counter moves, or
        stands still for a full lease of this machine's clock (its holder is gone).
        """
        while True:
            verdict = self.ledger.leader_verdict(self.settings.lease_s, time.monotonic())
            if verdict is not Verdict.UNSURE:
                return verdict is Verdict.ALIVE
            time.sleep(self.WATCH_LEADER_EVERY_S)

    def live_nodes(self) -> list[Any]:
        """Nodes whose heartbeat is within one lease."""
        now = time.time()
        return [n for n in self.ledger.nodes() if n.alive(now, self.settings.lease_s) and not n.drain]

    def nodes(self, now: float, include_left: bool = False) -> list[Any]:
        """Nodes alive at ``now`` (a heartbeat within one lease, draining or not); with ``include_left``, every one."""
        return [n for n in self.ledger.nodes() if include_left or n.alive(now, self.settings.lease_s)]

    def call(self, message: Request | dict[str, Any]) -> dict[str, Any]:
        """Ask the orchestrator; with none alive, act as one for this single request.

        A leader record that looks live gets the request through the queue at once; while the reply is
        awaited its heartbeat counter is watched, and a counter that stands still for a full lease means
        nobody leads (handlers are idempotent, so the request left in the queue does no harm).
        """
        gone = _LeaderGone(self.ledger, self.settings.lease_s, self.WATCH_LEADER_EVERY_S)
        reply = None
        if not gone.is_set():
            try:
                reply = self.queue.request(message, timeout=self.settings.lease_s + 15, stop=gone)
            except Unreachable:
                if not gone.is_set():
                    raise
        if reply is None:
            orch = Orchestrator(self.settings, self.ledger, self.queue)
            orch.lead()
            try:
                reply = orch.handle(message)
            finally:
                self.ledger.release_leadership(orch.me)
        if not reply.get("ok"):
            raise DlorchError(reply.get("reason", "request refused"))
        return reply

    def submit(self, spec: dict[str, Any]) -> str:
        """Record a job and return its id.

        The spec is checked here first, so a bad one is a one-line error at once rather than after
        a wait for an orchestrator (which checks it again: it trusts no client).
        """
        parse_spec(spec)
        from dlorch.orchestrator.submit import resolve_model_options

        spec = resolve_model_options(self, dict(spec))  # options.init_from as a job id: its model's URI
        # The id is chosen here so that a request re-sent after a lost reply is the same job.
        return self.call(Submit(spec=spec, job_id=new_job_id()))["job"]

    def wait(self, job_id: str, on_update: Callable[[Job], None] | None = None, poll_s: float = 0.5) -> Job:
        """Poll the ledger until the job ends."""
        while True:
            job = self.ledger.get(job_id)
            if on_update:
                on_update(job)
            if job.status.is_terminal():
                return job
            time.sleep(poll_s)

    def fetch(self, uri: str, out: Path) -> Path:
        """Copy a result from the store to a local path."""
        return self.store.get_file(uri, out)

    def logs(self, job: Job) -> list[str]:
        """The job's ledger history, then each attempt's agent log."""
        lines = [f"{time.strftime('%H:%M:%S', time.localtime(t))} {text}" for t, text in job.events]
        for att in job.attempts:
            key = f"jobs/{job.id}/attempts/{att.token}/log.txt"
            if self.store.exists(key):
                lines.append(f"--- attempt {att.token} on {att.node} ---")
                lines.extend(self.store.read_bytes(self.store.uri(key)).decode(errors="replace").splitlines())
        return lines


class _LeaderGone:
    """A stop flag for a request's wait: set once the leader's heartbeat counter stood still for a lease.

    It looks at the ledger at most every ``every_s`` (the wait polls far more often); once set, it stays set.
    """

    def __init__(self, ledger: Ledger, lease_s: float, every_s: float) -> None:
        self.ledger, self.lease_s, self.every_s = ledger, lease_s, every_s
        self.gone = False
        self._next_look = 0.0

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self.gone and now >= self._next_look:
            self.gone = self.ledger.leader_verdict(self.lease_s, now) is Verdict.GONE
            self._next_look = now + self.every_s
        return self.gone


class LocalService:
    """An orchestrator thread and agent subprocesses on this machine, for as long as it is open."""

    def __init__(self, client: Client, agents: int = 1, orchestrate: bool = True,
                 agent_args: list[str] | None = None, log_dir: Path | None = None):
        self.client, self.log_dir = client, log_dir
        self.orch: Orchestrator | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.agents: list[tuple[str, subprocess.Popen]] = []
        self.error: BaseException | None = None
        if orchestrate:
            self.orch = Orchestrator(client.settings, client.ledger, Queue(client.queue.url, client.signer))
            self.orch.lead()
            self.thread = threading.Thread(target=self._run, name="orchestrator", daemon=True)
            self.thread.start()
        for _ in range(agents):
            self.add_agent(agent_args or [])

    def serve(self, stop: threading.Event) -> None:
        """Keep the service up until ``stop`` is set; an error of the orchestrator thread is raised here."""
        while not stop.wait(0.5):
            if self.error is not None:
                raise self.error

    def _run(self) -> None:
        try:
            self.orch.run(self.stop)
        except BaseException as e:  # surfaced by the CLI
            self.error = e

    def add_agent(self, extra: list[str]) -> str:
        """Start an agent subprocess; returns its node id."""
        node_id = f"local-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "DLORCH_STORE": self.client.settings.resolved_store(),
               "DLORCH_QUEUE": self.client.settings.resolved_queue(),
               "DLORCH_SECRET": self.client.settings.resolved_secret().decode()}
        # The agent stops when this process ends, even by SIGKILL (--parent): a local agent never outlives its command.
        cmd = [sys.executable, "-m", "dlorch.orchestrator.cli", "agent", "--node-id", node_id, "--parent",
               str(os.getpid()), *extra]
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        if self.log_dir is not None:  # keep the agent's log off the user's progress bar
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_dir / f"{node_id}.log", "ab")
            kwargs.update(stdout=log_file, stderr=subprocess.STDOUT)
        self.agents.append((node_id, subprocess.Popen(cmd, env=env, **kwargs)))
        return node_id

    def close(self, timeout: float = 120.0) -> None:
        """Drain the agents (they hand back what they hold), then stop the orchestrator."""
        for node_id, proc in self.agents:
            if proc.poll() is None:
                try:
                    if self.orch:
                        reply = self.orch.handle(Drain(node=node_id))
                    else:
                        reply = self.client.call(Drain(node=node_id))
                    drained = bool(reply.get("ok"))
                except DlorchError:
                    drained = False
                if not drained:  # not registered yet (still starting): it holds nothing, so a signal stops it
                    proc.terminate()
        deadline = time.monotonic() + timeout
        for _, proc in self.agents:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=10)
        if self.orch:
            self.client.ledger.release_leadership(self.orch.me)


def ensure_local_service(client: Client, agents: int = 1) -> LocalService | None:
    """With no orchestrator or no agent running, start what is missing for the duration of a command.

    Several local agents (for candidates trained side by side) share the CPU cores between them.
    """
    from dlorch.nodeagent.hardware import cpu_count

    orchestrate = not client.orchestrator_alive()
    wanted = 0 if client.live_nodes() else max(1, min(agents, cpu_count()))
    if not orchestrate and not wanted:
        return None
    root = client.store.local_root
    log_dir = (root if root is not None else Path.home() / ".dlorch") / "agent-logs"
    extra = ["--threads", str(max(1, cpu_count() // wanted))] if wanted > 1 else []
    return LocalService(client, agents=wanted, orchestrate=orchestrate, log_dir=log_dir, agent_args=extra)


@contextlib.contextmanager
def local_service(client: Client, agents: int = 1) -> Iterator[LocalService | None]:
    """``ensure_local_service`` for the length of a ``with`` block, closed (its agents drained) on leaving it."""
    service = ensure_local_service(client, agents)
    try:
        yield service
    finally:
        if service is not None:
            service.close()

