"""What the dashboard shows, read-only: jobs, the queue in dispatch order, nodes, spend, one job's detail.

``Overview`` reads the ledger, the queue and the store, and (inside ``dlorch up``) the orchestrator's
in-memory node heartbeats, which are newer than their ledger copies. It writes nothing anywhere: the
page's actions go through the same requests as ``dlorch cancel`` and ``dlorch nodes drain``
(``dashboard.py``). The models below are the JSON API's response schemas (``/openapi.json``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from pydantic import BaseModel, Field

from dlorch.core import protocol
from dlorch.core.errors import one_line
from dlorch.core.spec import Job, JobStatus, NodeInfo, check_id

MAX_JOBS = 300  # the newest jobs listed; older ones stay in the ledger (`dlorch jobs`)
MAX_LOG_LINES = 2000  # the last lines of a job's logs shown on the page
HELD_OUT = ("val_iou", "val_loss")  # the held-out score shown in the job list, the first the job reports


class JobRow(BaseModel):
    """One job in the list."""

    id: str
    name: str | None
    kind: str
    task: str
    status: JobStatus
    priority: int
    node: str | None
    attempts: int
    epochs_done: int
    epochs_total: int | None
    progress: float | None = Field(description="0..1: epochs, or blocks of a blockwise job; None if unknown")
    held_out: dict[str, float] = Field(description="the newest held-out score (val_iou, else val_loss)")
    created_at: float
    updated_at: float
    error: str | None
    cancellable: bool


class AttemptRow(BaseModel):
    token: int
    node: str | None
    outcome: str
    started_at: float | None
    ended_at: float | None
    epochs_start: int
    epochs_done: int
    error: str | None


class JobDetail(JobRow):
    """One job with its history, attempts, metrics and curves."""

    image: str
    labels: str | None
    model: str | None
    output: str | None
    metrics: dict[str, float]
    curve: list[dict[str, float]] = Field(description="per-epoch metrics, {'epoch': n, 'train_loss': ...}")
    events: list[tuple[float, str]]
    attempt_list: list[AttemptRow]
    blocks: dict[str, Any] | None
    plan_reasons: list[str]


class QueueEntry(BaseModel):
    """A dispatch message waiting in the queue; ``current`` is False for one a claim will drop (stale or a copy)."""

    position: int
    job: str
    kind: str
    priority: int
    token: int
    name: str | None
    status: JobStatus | None
    current: bool


class NodeRow(BaseModel):
    id: str
    hostname: str
    kind: str = Field(description="who runs it: the provider that launched it and its type, or static (an agent "
                      "started by hand)")
    accelerator: str = Field(description="gpu or cpu")
    hardware: str
    precision: str
    state: str
    job: str | None
    heartbeat_age_s: float
    alive: bool
    drain: bool
    price_usd_h: float | None = Field(None, description="what the node bills per hour, if the fleet launched it")


class Spend(BaseModel):
    """Billed in the current cap period (at price ceilings, as the cap counts it); ``cap_usd`` None: no cap."""

    cap_usd: float | None = None
    spent_usd: float | None = None
    period_s: float | None = None
    provider: str | None = None
    text: str = "no cap set"


def _money(usd: float) -> str:
    return f"${usd:,.2f}" if usd >= 0.995 or usd == 0 else f"${usd:.3f}"


def fleet_state(ledger: Any, now: float) -> tuple[Spend, dict[str, dict]]:
    """The spend against the cap and each launched node's fleet record, from the fleet's ledger records."""
    from dlorch.orchestrator.fleet import config as fleet_config
    from dlorch.orchestrator.fleet import records as rec

    scale = fleet_config.load(ledger).scale
    instances = []
    for d in ledger.records(rec.INSTANCES):
        try:
            instances.append(rec.InstanceRecord.from_json(d))
        except (TypeError, ValueError):
            continue
    billing_min = 0.0 if scale.provider in FREE_PROVIDERS else scale.billing_min_s
    spent = rec.spent_usd(instances, rec.period_start(now, scale.cap_period_s), now, billing_min,
                          scale.billing_granularity_s)
    period = fleet_config.format_duration(scale.cap_period_s)
    if scale.cap_usd is None:
        text = "no cap set" + (f" ({_money(spent)} spent this {period})" if spent > 0 else "")
    else:
        text = f"{_money(spent)} of {_money(scale.cap_usd)} cap per {period}"
    spend = Spend(cap_usd=scale.cap_usd, spent_usd=spent, period_s=scale.cap_period_s, provider=scale.provider,
                  text=text)
    return spend, rec.node_fleet_info(ledger, now)


FREE_PROVIDERS = ("local", "slurm")  # their machines bill nothing (the fleet controller's FREE)
FLEET_EVERY_S = 5.0  # the fleet's records are read at most this often


class Summary(BaseModel):
    counts: dict[str, int]
    queued_messages: int
    nodes_alive: int
    now: float


class Logs(BaseModel):
    job: str
    lines: list[str]


def _held_out(metrics: dict[str, float]) -> dict[str, float]:
    for key in HELD_OUT:
        if key in metrics:
            return {key: metrics[key]}
    return {}


def job_row(j: Job) -> dict[str, Any]:
    progress = None
    if j.blocks and j.blocks.get("total"):
        progress = min(1.0, j.blocks.get("done", 0) / j.blocks["total"])
    elif j.epochs_total:
        progress = min(1.0, j.epochs_done / j.epochs_total)
    if j.status is JobStatus.SUCCEEDED:
        progress = 1.0
    return dict(id=j.id, name=j.spec.name, kind=j.spec.kind, task=j.spec.task, status=j.status,
                priority=j.spec.priority, node=j.node, attempts=len(j.attempts), epochs_done=j.epochs_done,
                epochs_total=j.epochs_total, progress=progress, held_out=_held_out(j.metrics),
                created_at=j.created_at, updated_at=j.updated_at, error=j.error,
                cancellable=not j.status.is_terminal() and not j.cancel_requested)


def job_detail(j: Job) -> JobDetail:
    reasons = [str(r) for r in (j.plan or {}).get("reasons", [])][:40]
    attempts = [AttemptRow(token=a.token, node=a.node, outcome=a.outcome.value, started_at=a.started_at,
                           ended_at=a.ended_at, epochs_start=a.epochs_start, epochs_done=a.epochs_done,
                           error=a.error) for a in j.attempts]
    return JobDetail(**job_row(j), image=j.spec.image, labels=j.spec.labels, model=j.model or j.spec.model,
                     output=j.output, metrics=j.metrics, curve=j.curve, events=j.events[-200:],
                     attempt_list=attempts, blocks=j.blocks, plan_reasons=reasons)


def _hardware(n: NodeInfo) -> str:
    gpus = ", ".join(f"{g.get('name', 'GPU')} {g.get('memory_bytes', 0) / 2**30:.0f} GiB" for g in n.gpus)
    return f"{n.cpus} CPUs, {n.memory_bytes / 2**30:.0f} GiB" + (f"; {gpus}" if gpus else "")


class Overview:
    """Read-only snapshots of one deployment for the page and the API.

    Args:
        client: the deployment's ``Client`` (ledger, store, queue URL, settings).
        node_infos: the orchestrator's newest node records (a callable returning them), if it runs here.
        fleet: a callable of ``now`` returning the spend and each launched node's fleet record; by default
            ``fleet_state`` of the ledger.
    """

    def __init__(self, client: Any, node_infos: Callable[[], dict[str, NodeInfo]] | None = None,
                 fleet: Callable[[float], tuple[Spend, dict[str, dict]]] | None = None) -> None:
        from dlorch.orchestrator.queue import Queue

        self.client, self.ledger, self.lease_s = client, client.ledger, client.settings.lease_s
        self.queue = Queue(client.queue.url, client.signer)  # its own connection: read-only use here
        self._node_infos = node_infos
        self._fleet_fn = fleet or (lambda now: fleet_state(self.ledger, now))
        self._fleet: tuple[float, Spend, dict[str, dict]] | None = None
        self._ended: dict[str, dict[str, Any]] = {}  # rows of ended jobs: their records no longer change
        self._lock = threading.Lock()
        self.last_rows: list[dict[str, Any]] | None = None  # what jobs() found last (the event sources share it)

    # -- jobs -----------------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        """The newest ``MAX_JOBS`` jobs, newest first; an ended job's record is read once."""
        with self._lock:
            ids = sorted((k.split("/", 1)[1] for k in self.ledger.store.list("jobs")), reverse=True)[:MAX_JOBS]
            rows = []
            for job_id in ids:
                row = self._ended.get(job_id)
                if row is None:
                    job = self._find(job_id)
                    if job is None:
                        continue
                    row = job_row(job)
                    if job.status.is_terminal():
                        self._ended[job_id] = row
                rows.append(row)
            rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
            self._ended = {r["id"]: r for r in rows if JobStatus(r["status"]).is_terminal()}  # the listed ones only
            self.last_rows = rows
            return rows

    def _find(self, job_id: str) -> Job | None:
        try:
            return self.ledger.find(job_id)
        except Exception:  # a damaged record is the CLI's to report; the page lists the rest
            return None

    def job(self, job_id: str) -> JobDetail | None:
        job = self._find(check_id("job", job_id))
        return job_detail(job) if job else None

    def logs(self, job_id: str) -> Logs | None:
        """The job's history and each attempt's uploaded log (the lines ``dlorch logs`` prints), the last ones."""
        job = self._find(check_id("job", job_id))
        if job is None:
            return None
        return Logs(job=job.id, lines=self.client.logs(job)[-MAX_LOG_LINES:])

    # -- queue ----------------------------------------------------------------------------------------
    def queue_entries(self, rows: list[dict[str, Any]] | None = None) -> list[QueueEntry]:
        """The dispatch messages in the order nodes will take them (priority, then first in first out)."""
        by_id = {r["id"]: r for r in (rows if rows is not None else self.jobs())}
        out, seen = [], set()
        for m in self.queue.jobs.items():
            d = protocol.parse_dispatch(m, quiet=True)
            if d is None:
                continue
            row = by_id.get(d.job)
            status = row["status"] if row else None
            current = (status is JobStatus.QUEUED and (d.job, d.token) not in seen) or (
                d.kind == "blocks" and status is JobStatus.WAITING)
            seen.add((d.job, d.token))
            out.append(QueueEntry(position=len(out) + 1, job=d.job, kind=d.kind, priority=d.priority,
                                  token=d.token, name=row["name"] if row else None, status=status,
                                  current=current))
        return out

    # -- nodes ----------------------------------------------------------------------------------------
    def nodes(self, now: float | None = None, include_left: bool = False) -> list[NodeRow]:
        """Nodes with their hardware, job and heartbeat age; the orchestrator's newest heartbeats win."""
        now = time.time() if now is None else now
        nodes = {n.id: n for n in self.ledger.nodes()}
        if self._node_infos is not None:
            nodes.update({k: v.model_copy() for k, v in list(self._node_infos().items())})
        fleet = self.fleet(now)[1]
        rows = []
        for n in sorted(nodes.values(), key=lambda n: n.registered_at):
            alive = n.alive(now, self.lease_s)
            if not alive and not include_left:
                continue
            f = fleet.get(n.id, {})
            kind = " ".join(str(x) for x in (f.get("kind"), f.get("type"), f.get("market")) if x) or "static"
            rows.append(NodeRow(id=n.id, hostname=n.hostname, kind=kind, accelerator="gpu" if n.gpus else "cpu",
                                hardware=_hardware(n), precision=n.precision, state=n.state, job=n.job,
                                heartbeat_age_s=round(max(0.0, now - n.heartbeat_at), 1), alive=alive,
                                drain=n.drain, price_usd_h=f.get("price_usd_h")))
        return rows

    # -- spend, summary ---------------------------------------------------------------------------------
    def fleet(self, now: float | None = None) -> tuple[Spend, dict[str, dict]]:
        """The spend and the fleet's node records, read at most every ``FLEET_EVERY_S``."""
        now = time.time() if now is None else now
        with self._lock:
            if self._fleet is None or abs(now - self._fleet[0]) >= FLEET_EVERY_S:
                try:
                    spend, nodes = self._fleet_fn(now)
                except Exception as e:  # a damaged fleet record: the page says so, the rest still shows
                    spend, nodes = Spend(text=f"spend unknown: {one_line(e)}"), {}
                self._fleet = (now, spend, nodes)
            return self._fleet[1], self._fleet[2]

    def spend(self) -> Spend:
        return self.fleet()[0]

    def summary(self, rows: list[dict[str, Any]] | None = None) -> Summary:
        rows = rows if rows is not None else self.jobs()
        counts: dict[str, int] = {s.value: 0 for s in JobStatus}
        for r in rows:
            counts[JobStatus(r["status"]).value] += 1
        return Summary(counts=counts, queued_messages=self.queue.jobs.size(),
                       nodes_alive=len(self.nodes()), now=time.time())

    def close(self) -> None:
        self.queue.close()
