"""The fleet controller: the IO edge that joins the autoscaling policy to the orchestrator and a provider.

Each ``tick(now)``:

1. reads the scale config from the ledger (``dlorch scale`` changes it while the orchestrator runs);
2. lists the provider's instances of this deployment and joins them to the ledger's instance records by
   node id: a launch whose instance id was never recorded (a crash between launch and record) is
   re-adopted, a spot price the provider reports is noted, one no longer listed has stopped billing (when
   the provider dates its end, else now);
3. asks the provider again for launches recorded but not yet seen (idempotent by node id);
4. builds a ``Snapshot``: queued work (and running jobs whose node is gone, awaiting requeue) and nodes
   from copies of the orchestrator's state (``Orchestrator.fleet_view``), instances from the list,
   ``known`` from the ledger, prices, measured throughput, spend in the cap period, recent launch failures;
5. calls ``policy.step`` and carries out its actions: Drain (through the orchestrator's own drain path,
   on its thread), Terminate (recorded), Launch (the intent recorded in the ledger FIRST, then the
   provider asked; a refusal recorded as a ``LaunchFailure`` that the next tick's policy moves past).

The controller writes only fleet records (``records.py``), never a job record (the orchestrator is their
single writer). ``run`` loops ``tick`` on its own thread every ``tick_s``: provider calls are slow and must
never hold up the orchestrator's request loop. Time is the orchestrator's clock, so tests simulate it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from dlorch.core.errors import DlorchError, one_line
from dlorch.core.protocol import Drain as DrainRequest
from dlorch.core.spec import Job, JobStatus, NodeInfo, check_id
from dlorch.orchestrator.fleet import config as fleet_config
from dlorch.orchestrator.fleet import records as rec
from dlorch.orchestrator.fleet.config import FleetConfig
from dlorch.orchestrator.fleet.model import (Decision, Drain, Instance, InstanceState, Launch, LaunchFailure, Market,
                                             NodeView, Provider, ProviderError, QueuedWork, ScaleConfig, Snapshot,
                                             Terminate)
from dlorch.orchestrator.fleet.records import InstanceRecord, State, WorkRate

log = logging.getLogger("dlorch.fleet")

Policy = Callable[[Snapshot, float], Decision]
NEVER_REGISTERED = "never-registered"
LIST_GRACE_S = 60.0  # a launch not listed yet within this is the provider's eventual consistency, not an end
FAILURE_MEMORY_S = 7200.0  # launch failures older than this no longer steer the policy
FREE = ("local", "slurm")  # providers whose machines cost nothing


def default_policy() -> Policy:
    from dlorch.orchestrator.fleet.policy import step

    return step


@dataclass
class TickResult:
    """What one tick saw and did (for logs and tests)."""

    snapshot: Snapshot | None = None
    decision: Decision | None = None
    launched: list[InstanceRecord] = field(default_factory=list)
    failed: list[LaunchFailure] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)


class FleetController:
    """Drives ``policy.step`` against one provider for the orchestrator ``source``.

    Args:
        source: the running ``Orchestrator`` (or anything with ``ledger``, ``settings``, ``clock``,
            ``fleet_view()`` and ``call_soon(fn)``/``handle(request)``).
        provider: the compute backend; its ``list()`` holds this deployment's instances only.
        config: a fixed config (tests); None: the ledger's, read every tick.
        prices: a loaded price table (``prices.load_prices()``); None: loaded here.
        policy: ``step(snapshot, now) -> Decision``; None: ``policy.step``.
        drain: how to drain a node; None: the orchestrator's drain, run on its own thread.
    """

    def __init__(self, source: Any, provider: Provider, *, config: FleetConfig | None = None, prices: Any = None,
                 policy: Policy | None = None, drain: Callable[[str], None] | None = None) -> None:
        self.source, self.provider = source, provider
        self.ledger = source.ledger
        self.clock: Callable[[], float] = source.clock
        self.lease_s: float = source.settings.lease_s
        self.deployment = check_id("deployment", getattr(source.settings, "deployment", "default"))
        self.fixed_config = config
        self.config = config or FleetConfig()
        if prices is None:
            from dlorch.orchestrator.fleet.prices import load_prices

            prices = load_prices()
        self.prices = prices
        self.policy = policy or default_policy()
        self._drain = drain or self._drain_through_orchestrator
        self.records: dict[str, InstanceRecord] = {}  # node id -> record
        self.failures: list[LaunchFailure] = []
        self.rates: dict[str, WorkRate] = {}
        self.idle_since: dict[str, float] = {}  # node id -> when this controller saw it become idle
        self._idle_written: dict[str, float] = {}
        self.ledger_nodes: dict[str, NodeInfo] = {}
        self._active_before: set[str] | None = None
        self.loaded = False
        self.last: TickResult | None = None

    # -- loading ----------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the fleet's records from the ledger (once, at start: this controller writes them after)."""
        now = self.clock()
        for d in self.ledger.records(rec.INSTANCES):
            try:
                r = InstanceRecord.from_json(d)
            except (TypeError, ValueError) as e:
                log.warning("skipped an unreadable instance record: %s", one_line(e))
                continue
            self.records[r.node_id] = r
        for d in self.ledger.records(rec.FAILURES):
            try:
                f = rec.failure_from_json(d)
            except (KeyError, TypeError, ValueError):
                continue
            if now - f.at < FAILURE_MEMORY_S:
                self.failures.append(f)
        for d in self.ledger.records(rec.RATES):
            try:
                r = WorkRate.from_json(d)
            except (KeyError, TypeError, ValueError):
                continue
            self.rates[r.type] = r
        self.ledger_nodes = {n.id: n for n in self.ledger.nodes()}
        idle = self.ledger.record(rec.IDLE) or {}
        self.idle_since = {k: float(v) for k, v in idle.items() if isinstance(v, (int, float))}
        self._idle_written = dict(self.idle_since)
        self.loaded = True

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """``tick`` every ``tick_s`` until ``stop`` is set; an error is logged and the next tick tries again."""
        while not stop.is_set():
            try:
                self.tick(self.clock())
            except Exception as e:  # a provider outage must not end the loop: the next tick retries
                log.warning("fleet tick failed: %s: %s", type(e).__name__, one_line(e))
            stop.wait(self.config.scale.tick_s)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="fleet", daemon=True)
        thread.start()
        return thread

    def tick(self, now: float | None = None) -> TickResult:
        """One control step at ``now`` (the orchestrator's clock): observe, decide, act, record."""
        now = self.clock() if now is None else now
        if not self.loaded:
            self.load()
        self.config = self.fixed_config or self._read_config()
        result = TickResult()
        if not self.config.active and not any(r.open for r in self.records.values()):
            _, nodes, blocks = self._view()
            self._node_views(nodes, blocks, {}, [], now)  # idle times for `dlorch nodes`
            self.last = result
            return result  # nothing launched and nothing to launch: no provider call
        listed = self.provider.list()
        self._reconcile(listed, now, result)
        self._resume_launches(listed, now, result)
        jobs, nodes, blocks = self._view()
        self._learn_rates(jobs, now)
        snapshot = self.snapshot(listed, jobs, nodes, blocks, now)
        decision = self.policy(snapshot, now)
        result.snapshot, result.decision = snapshot, decision
        self._apply(decision, snapshot, now, result)
        for note in decision.notes:
            log.debug("fleet: %s", note)
        self.last = result
        return result

    def stop_all(self, reason: str, now: float | None = None) -> list[str]:
        """Terminate every instance this deployment's provider lists (``dlorch up`` ending with local agents,
        which cannot outlive it), recorded as any other termination; returns the ids still listed."""
        now = self.clock() if now is None else now
        if not self.loaded:
            self.load()
        listed = self.provider.list()
        self._reconcile(listed, now, TickResult())
        live = [i.id for i in listed if i.state is not InstanceState.STOPPING]
        if live:
            self.provider.terminate(live)
            for r in self.records.values():
                if r.instance_id in live and r.terminate_at is None:
                    r.terminate_at, r.terminate_reason = now, reason
                    self._put(r)
        return [i.id for i in listed]

    def observe(self, now: float | None = None) -> list[Instance]:
        """List the provider's instances and bring the records in line (ended ones stop billing)."""
        now = self.clock() if now is None else now
        listed = self.provider.list()
        self._reconcile(listed, now, TickResult())
        return listed

    # -- observing ----------------------------------------------------------------------------------
    def _read_config(self) -> FleetConfig:
        try:
            return fleet_config.load(self.ledger)
        except DlorchError as e:  # a damaged record: keep the last good config
            log.warning("%s", e)
            return self.config

    def _view(self) -> tuple[list[Job], list[NodeInfo], list[dict]]:
        view = self.source.fleet_view()
        jobs, nodes = view[0], view[1]
        blocks = view[2] if len(view) > 2 else []
        return jobs, nodes, blocks

    def _reconcile(self, listed: list[Instance], now: float, result: TickResult) -> None:
        """Join the provider's list to the records: adopt instance ids, reopen, and end what is gone."""
        by_instance = {r.instance_id: r for r in self.records.values() if r.instance_id}
        seen: set[str] = set()
        for inst in listed:
            r = by_instance.get(inst.id) or (self.records.get(inst.node_id) if inst.node_id else None)
            if r is None:
                continue  # not ours by the ledger: the policy terminates it as a leak
            seen.add(r.node_id)
            changed = False
            if r.instance_id != inst.id:
                r.instance_id, changed = inst.id, True
                result.adopted.append(inst.id)
            if r.launched_at is None:
                r.launched_at, changed = min(inst.launched_at, now), True  # a provider clock ahead bills from now
            if r.state != State.RUNNING and inst.state is not InstanceState.TERMINATED:
                r.state, r.ended_at, changed = State.RUNNING, None, True  # launching, or listed again
            as_of = now if inst.price_as_of is None else min(inst.price_as_of, now)
            if r.observe(inst.price_since, as_of, inst.price_usd_h):
                changed = True
            if changed:
                self._put(r)
        gone = [r for r in self.records.values() if r.node_id not in seen and r.state == State.RUNNING
                and not (r.terminate_at is None and now - (r.launched_at or r.requested_at) < LIST_GRACE_S)]
        reported = self._ended([r.instance_id for r in gone if r.instance_id])
        for r in gone:
            start = r.launched_at if r.launched_at is not None else r.requested_at
            at = reported.get(r.instance_id or "")
            r.state, r.ended_at = State.ENDED, now if at is None else min(max(at, start), now)
            self._put(r)
            result.ended.append(r.instance_id or r.node_id)

    def _ended(self, instance_ids: list[str]) -> dict[str, float]:
        """When the provider says these instances stopped billing (those it can date): their billing ends
        there, not at the tick that found them gone."""
        ended = getattr(self.provider, "ended", None)
        if not instance_ids or ended is None:
            return {}
        try:
            return {k: float(v) for k, v in ended(instance_ids).items()}
        except (ProviderError, TypeError, ValueError) as e:  # undated: billed to this tick (the safe side)
            log.warning("fleet: end times of %s unknown: %s", ", ".join(instance_ids), one_line(e))
            return {}

    def _resume_launches(self, listed: list[Instance], now: float, result: TickResult) -> None:
        """Ask again for launches recorded but not seen (a crash or an error left them unknown): by node id,
        so a machine that did start is returned, not started twice."""
        listed_nodes = {i.node_id for i in listed}
        for r in list(self.records.values()):
            if r.state == State.LAUNCHING and r.node_id not in listed_nodes:
                if now - r.requested_at > self.config.scale.register_timeout_s:
                    r.state, r.error = State.FAILED, "the launch was never confirmed"
                    self._put(r)
                    continue
                self._launch(r, now, result)

    def scale_config(self) -> ScaleConfig:
        """The policy's config: a free provider's machines have no billing minimum to use up before they go."""
        cfg = self.config.scale
        if cfg.provider in FREE:
            cfg = dataclasses.replace(cfg, billing_min_s=0.0)
        return cfg

    def snapshot(self, listed: list[Instance], jobs: list[Job], nodes: list[NodeInfo], blocks: list[dict],
                 now: float) -> Snapshot:
        """The policy's input, built from copies: nothing here writes."""
        cfg = self.scale_config()
        known = frozenset(r.instance_id for r in self.records.values() if r.instance_id)
        instances = tuple(listed)
        node_instance = {r.node_id: r.instance_id for r in self.records.values() if r.open and r.instance_id}
        return Snapshot(
            config=cfg, queue=self._queued(jobs, blocks, nodes, now), instances=instances, known=known,
            nodes=self._node_views(nodes, blocks, node_instance, listed, now),
            prices=self.prices.table, throughput=rec.throughput(self.rates, self.prices.priors),
            spent_usd=self.spent(now), period_start=rec.period_start(now, cfg.cap_period_s),
            failures=tuple(f for f in self.failures if now - f.at < FAILURE_MEMORY_S),
            ceilings=self.prices.ceilings, gpus=self.prices.gpus, priors=self.prices.priors)

    def spent(self, now: float) -> float:
        """Billed in the current cap period as the cap counts it: reported prices, ceilings where none is."""
        cfg = self.scale_config()
        return rec.spent_usd(list(self.records.values()), rec.period_start(now, cfg.cap_period_s), now,
                             cfg.billing_min_s, cfg.billing_granularity_s)

    def _wants_gpu(self, job: Job) -> bool:
        """Training wants a GPU when the fleet may launch a type known to have one; otherwise (CPU types,
        or local and Slurm nodes whose GPUs the price table does not state) any node may take it."""
        if not job.spec.trains:
            return False
        cfg = self.config.scale
        types = cfg.instance_types or ((cfg.provider,) if cfg.provider in FREE else tuple(self.prices.gpus))
        return any(self.prices.gpus.get(t, 0) > 0 for t in types)

    def _queued(self, jobs: list[Job], blocks: list[dict], nodes: list[NodeInfo] = (),
                now: float | None = None) -> tuple[QueuedWork, ...]:
        """Queued jobs and blocks, and running jobs whose node is gone or no longer reports them (their lease
        lapses into a requeue: after a restart that takes up to a lease, and they must find a machine then)."""
        out = []
        alive = {n.id: n for n in nodes if now is None or n.alive(now, self.lease_s)}
        for job in jobs:
            if job.status is JobStatus.QUEUED:
                queued_at = job.attempts[-1].ended_at if job.attempts and job.attempts[-1].ended_at else job.created_at
                out.append(QueuedWork(job.id, job.spec.kind, self._wants_gpu(job), job.spec.priority, queued_at))
            elif job.status is JobStatus.RUNNING and job.current is not None:
                holder = alive.get(job.current.node or "")
                if holder is None or holder.job != job.id:
                    out.append(QueuedWork(job.id, job.spec.kind, self._wants_gpu(job), job.spec.priority,
                                          job.current.started_at or job.created_at, awaiting_requeue=True))
        for b in blocks:  # a blockwise job's blocks nobody holds wait for nodes too
            if b["left"] > len(b["holders"]):
                out.append(QueuedWork(b["job"], "block", False, int(b["priority"]), float(b["created_at"])))
        return tuple(out)

    def _node_views(self, nodes: list[NodeInfo], blocks: list[dict], node_instance: dict[str, str],
                    listed: list[Instance], now: float) -> tuple[NodeView, ...]:
        """Alive nodes, and every node of a live launched instance (one that left or was lost shows as
        drained and idle, so its machine is stopped, not mistaken for one still booting)."""
        for n in nodes:
            self.ledger_nodes[n.id] = n
        holders = {h for b in blocks for h in b["holders"]}
        listed_nodes = {i.node_id for i in listed if i.node_id}
        out = []
        for n in self.ledger_nodes.values():
            alive = n.alive(now, self.lease_s)
            launched = n.id in node_instance and n.id in listed_nodes
            if not alive and not launched:
                self.idle_since.pop(n.id, None)
                continue
            busy = alive and (n.job is not None or n.id in holders)
            if busy:
                self.idle_since.pop(n.id, None)
                since = None
            else:
                since = self.idle_since.setdefault(n.id, now)
            out.append(NodeView(node_id=n.id, instance_id=node_instance.get(n.id), busy=busy, idle_since=since,
                                draining=n.drain or not alive, gpu=bool(n.gpus)))
        if self.idle_since != self._idle_written:  # `dlorch nodes` shows idle times; a restart keeps them
            self.ledger.put_record(rec.IDLE, dict(self.idle_since))
            self._idle_written = dict(self.idle_since)
        return tuple(out)

    # -- acting ------------------------------------------------------------------------------------
    def _apply(self, decision: Decision, snapshot: Snapshot, now: float, result: TickResult) -> None:
        """Drains first (a node told before its machine stops hands its job back), then terminations (one
        batch), then launches: the policy's order."""
        by_id = {i.id: i for i in snapshot.instances}
        registered = {n.node_id for n in snapshot.nodes}
        for a in decision.actions:
            if isinstance(a, Drain):
                log.info("fleet: draining node %s (%s)", a.node_id, a.reason)
                self._drain(a.node_id)
                result.drained.append(a.node_id)
        stops = [a for a in decision.actions if isinstance(a, Terminate)]
        if stops:
            try:
                self.provider.terminate([a.instance_id for a in stops])
            except ProviderError as e:  # the next tick's policy asks again
                log.warning("terminate %s failed: %s", ", ".join(a.instance_id for a in stops), one_line(e))
                stops = []
        for a in stops:
            result.terminated.append(a.instance_id)
            inst = by_id.get(a.instance_id)
            r = next((r for r in self.records.values() if r.instance_id == a.instance_id), None)
            log.info("fleet: terminating %s (%s)", a.instance_id, a.reason)
            if r is not None and r.terminate_at is None:
                r.terminate_at, r.terminate_reason = now, a.reason
                self._put(r)
            if a.reason.startswith(NEVER_REGISTERED) and inst is not None and inst.node_id not in registered:
                self._fail(LaunchFailure(inst.type, inst.zone, inst.market, now, NEVER_REGISTERED), result)
        for a in decision.actions:
            if isinstance(a, Launch):
                self._start(a, now, result)

    def _start(self, action: Launch, now: float, result: TickResult) -> None:
        """Record the launch's intent, then launch."""
        req = action.request
        check_id("node", req.node_id)
        if req.node_id in self.records:  # the policy reused a node id: never a second machine under it
            log.warning("fleet: node id %s was launched before; launch skipped", req.node_id)
            return
        price = self.prices.table.get((req.type, Market(req.market).value), req.price_ceiling_usd_h)
        r = InstanceRecord(node_id=req.node_id, provider=getattr(self.provider, "name", "?"), type=req.type,
                           market=Market(req.market).value, ceiling_usd_h=req.price_ceiling_usd_h, price_usd_h=price,
                           reserve_usd=action.reserve_usd, requested_at=now, zone=req.zone, reason=action.reason)
        self.records[r.node_id] = r
        self._put(r)  # FIRST: a restart knows this launch may have happened
        log.info("fleet: launching %s %s %s as node %s (%s)", req.type, r.market, req.zone or "", req.node_id,
                 action.reason)
        self._launch(r, now, result)

    def _launch(self, r: InstanceRecord, now: float, result: TickResult) -> None:
        try:
            inst = self.provider.launch(r.request())
        except ProviderError as e:
            from dlorch.orchestrator.fleet.policy import failure_kind

            r.state, r.error = State.FAILED, one_line(e)
            self._put(r)
            self._fail(LaunchFailure(r.type, r.zone, Market(r.market), now, failure_kind(e)), result)
            log.warning("fleet: launch of %s (%s) refused: %s", r.node_id, r.type, one_line(e))
            return
        except Exception as e:  # unknown whether it started: the next tick asks again under the same node id
            log.warning("fleet: launch of %s (%s) failed: %s: %s", r.node_id, r.type, type(e).__name__, one_line(e))
            return
        r.instance_id, r.launched_at, r.state = inst.id, min(inst.launched_at, now), State.RUNNING
        self._put(r)
        result.launched.append(r)

    def _fail(self, failure: LaunchFailure, result: TickResult) -> None:
        self.failures = [f for f in self.failures if failure.at - f.at < FAILURE_MEMORY_S] + [failure]
        self.ledger.put_record(f"{rec.FAILURES}/{int(failure.at * 1000)}-{uuid.uuid4().hex[:6]}",
                               rec.failure_to_json(failure))
        result.failed.append(failure)

    def _drain_through_orchestrator(self, node_id: str) -> None:
        """The orchestrator's drain, run on its own thread (it writes the node record)."""
        source = self.source
        source.call_soon(lambda: source.handle(DrainRequest(node=node_id)))

    def _put(self, r: InstanceRecord) -> None:
        self.ledger.put_record(r.key, r.to_json())

    # -- work rates ---------------------------------------------------------------------------------
    def node_type(self, node_id: str | None) -> str | None:
        r = self.records.get(node_id or "")
        return r.type if r is not None else None

    def _learn_rates(self, jobs: list[Job], now: float) -> None:
        """Add the attempts of jobs that ended since the last tick to their node types' work rates."""
        active = {j.id for j in jobs}
        before, self._active_before = self._active_before, active
        if before is None:
            return
        changed: set[str] = set()
        for job_id in before - active:
            try:
                job = self.ledger.find(job_id)
            except DlorchError:
                continue
            if job is None:
                continue
            for att in job.attempts:
                type_ = self.node_type(att.node)
                if type_ is None or att.started_at is None or att.ended_at is None:
                    continue
                work = max(0, att.epochs_done - att.epochs_start)
                if work <= 0:
                    continue
                rate = self.rates.setdefault(type_, WorkRate(type_))
                rate.work += work
                rate.seconds += max(0.0, att.ended_at - att.started_at)
                changed.add(type_)
        for type_ in changed:
            self.ledger.put_record(f"{rec.RATES}/{type_}", self.rates[type_].to_json())


def make_provider(config: FleetConfig, settings: Any, **local_kw: Any) -> Provider:
    """The provider the config names, for ``settings.deployment``.

    Raises:
        BadInput: the provider's settings are missing (``config.check``).
    """
    fleet_config.check(config)
    name = config.scale.provider
    deployment = getattr(settings, "deployment", "default")
    if name == "local":
        from dlorch.orchestrator.fleet.local import LocalProvider

        return LocalProvider(deployment, settings=settings, **local_kw)
    if name == "ec2":
        from dlorch.orchestrator.fleet.ec2 import Ec2Provider

        return Ec2Provider(deployment, config.region, config.launch_template, subnets=config.subnets)
    from dlorch.orchestrator.fleet.slurm import SlurmProvider

    return SlurmProvider(deployment, config.slurm_script, partition=config.partition)
