"""The autoscaling policy: one pure step from a fleet ``Snapshot`` and ``now`` to launch, drain and terminate.

No IO and no clock: the controller builds the snapshot, calls ``step`` every ``config.tick_s`` and carries
the actions out. The rules, in the order ``step`` applies them:

1. Leaks: an instance the ledger did not record (not in ``snapshot.known``) is terminated; so is a launched
   instance whose agent has not registered ``register_timeout_s`` after launch ("never-registered").
2. Hard cap. Every live instance reserves the worst case it may still bill: its price ceiling times
   ``max(launched_at + billing_min_s, now + tick_s + termination_latency_s) - now`` (it is stopped at the
   next tick at the latest), plus one billing granule. One being terminated now reserves the same with
   ``now + termination_latency_s``. If ``spent + reserved`` exceeds the cap, instances are terminated
   (idle first) until it fits; within ``drain_horizon`` of that, busy nodes are drained so that their jobs
   hand back before their machines stop. A launch happens only if ``spent + reserved + its own worst case``
   fits. Induction: if that held at the previous tick (at most ``tick_s`` ago), terminating everything now
   fits, so the cap is never crossed as long as the controller ticks every ``tick_s`` and ``spent_usd``
   covers all billing up to ``now``. Reservations are not cut at the cap period's end: billing that
   straddles it is counted against both periods, which is safe for both.
3. Scale in: a paid node idle for ``idle_s`` is drained and terminated in the same tick (Drain comes first
   in the actions, so the agent takes no job meanwhile) once keeping it to the next tick would bill more than
   stopping it now (``bills_more_later``: past its billing minimum, and at the end of a paid granule when
   billing is by the hour); the longest idle goes first; any drained node that is idle is terminated; never
   below ``min_nodes``. Actions come in the order Drain, Terminate, Launch.
4. Scale out: queued work (higher priority, then older, first) goes to idle free nodes, then idle paid nodes,
   then instances still booting; work awaiting requeue (its lease's node is gone, the lease not yet lapsed)
   is demand too: it holds an idle or booting machine from scale-in, but launches nothing until it is queued
   again. For the rest, the cheapest type per unit of work (price / throughput,
   measured or prior) that can run it is launched, free before spot before on-demand, at most
   ``max_launch_per_tick`` a tick and ``max_nodes`` launched instances in all, and only with budget for
   ``LAUNCH_RUNWAY_S`` of running beyond its worst case. On-demand is allowed after
   ``spot_failures_before_on_demand`` spot capacity or quota failures, or once work has waited
   ``spot_wait_before_on_demand_s``. A type/zone/market without capacity is avoided for ``capacity_avoid_s``,
   a quota failure or an instance that never registered avoids its type for ``avoid_s``, throttling pauses
   every launch for a backoff that doubles per recent throttle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dlorch.orchestrator.fleet.model import (
    Decision, Drain, Instance, InstanceState, Launch, LaunchFailure, LaunchRequest, Market, NodeView, QueuedWork,
    Snapshot, Terminate,
)

THROTTLE_BACKOFF_MAX_S = 300.0
# a launch needs budget for this much running beyond its worst case, or it would boot, bill, and be stopped
# by the cap before doing useful work (and the freed reservation would launch the next one the same way)
LAUNCH_RUNWAY_S = 900.0
# reasons the controller can match on (it records a "never-registered" LaunchFailure for that one)
LEAK = "leak: not recorded in the ledger"
NEVER_REGISTERED = "never-registered"
CAP = "cap"
IDLE = "idle"


@dataclass(frozen=True)
class Candidate:
    """A launchable (type, market, zone) with its expected and worst-case price."""

    type: str
    market: Market
    zone: str | None
    price: float  # expected $/h
    ceiling: float  # the most it bills per hour
    unit_cost: float  # expected $ per unit of work
    gpu: bool


def drain_horizon(config) -> float:
    """How far ahead the cap is watched to drain busy nodes before they must stop: three ticks, >= 60 s."""
    return max(3 * config.tick_s, 60.0)


def ceiling_of(snapshot: Snapshot, type_: str, market: Market | str) -> float | None:
    """The most ``type_`` bills per hour on ``market``; spot falls back to the on-demand price (AWS's default)."""
    market = Market(market).value
    if (type_, market) in snapshot.ceilings:
        return snapshot.ceilings[(type_, market)]
    if market == Market.SPOT.value:
        od = snapshot.prices.get((type_, Market.ON_DEMAND.value))
        if od is not None:
            return max(od, snapshot.prices.get((type_, market), 0.0))
    return snapshot.prices.get((type_, market))


def worst_case_usd(instance: Instance, now: float, config, stop_now: bool) -> float:
    """What ``instance`` may still bill from ``now``: until stopped at this tick (``stop_now``) or the next."""
    end = now + config.termination_latency_s + (0.0 if stop_now else config.tick_s)
    end = max(end, instance.launched_at + config.billing_min_s)
    seconds = end - now + config.billing_granularity_s
    return instance.price_ceiling_usd_h * seconds / 3600.0


def launch_worst_case_usd(ceiling: float, config) -> float:
    """A new launch's worst case: it may start billing up to a tick late and be stopped one tick after."""
    seconds = max(config.billing_min_s, config.tick_s + config.termination_latency_s) + config.tick_s
    return ceiling * (seconds + config.billing_granularity_s) / 3600.0


def bills_more_later(instance: Instance, now: float, config) -> bool:
    """Whether stopping ``instance`` at the next tick would bill more than stopping it now (the billing
    minimum and the granule, e.g. an hour, already paid for cost nothing more to keep)."""
    def billed_until(stop: float) -> float:
        seconds = max(stop + config.termination_latency_s - instance.launched_at, config.billing_min_s)
        granule = config.billing_granularity_s
        if granule > 0:
            seconds = math.ceil(seconds / granule - 1e-9) * granule
        return instance.launched_at + seconds

    return billed_until(now + config.tick_s) > billed_until(now) + 1e-9


def step(snapshot: Snapshot, now: float) -> Decision:
    """The actions for this tick. Pure: same snapshot and ``now``, same decision."""
    cfg = snapshot.config
    decision = Decision()
    notes = decision.notes
    live = [i for i in snapshot.instances if i.state in (InstanceState.PENDING, InstanceState.RUNNING)]
    stopping = [i for i in snapshot.instances if i.state == InstanceState.STOPPING]
    node_of = _nodes_by_instance(snapshot.nodes, live + stopping)
    terminating: dict[str, str] = {}  # instance id -> reason
    draining: dict[str, str] = {}  # node id -> reason

    # 1. leaks
    for inst in live:
        if inst.id not in snapshot.known:
            terminating[inst.id] = LEAK
        elif inst.id not in node_of and now - inst.launched_at >= cfg.register_timeout_s:
            terminating[inst.id] = NEVER_REGISTERED

    # 2. hard cap: what everything may still bill, if stopped at this tick or the next
    budget = math.inf if cfg.cap_usd is None else cfg.cap_usd - snapshot.spent_usd
    reserve = {i.id: worst_case_usd(i, now, cfg, stop_now=i.id in terminating) for i in live}
    reserved = sum(worst_case_usd(i, now, cfg, stop_now=True) for i in stopping) + sum(reserve.values())

    def stop(inst: Instance, reason: str) -> None:
        nonlocal reserved
        terminating[inst.id] = reason
        new = worst_case_usd(inst, now, cfg, stop_now=True)
        reserved += new - reserve[inst.id]
        reserve[inst.id] = new

    victims = sorted((i for i in live if i.id not in terminating and i.price_ceiling_usd_h > 0),
                     key=lambda i: _victim_order(i, node_of))
    for inst in victims:
        if reserved <= budget:
            break
        stop(inst, CAP)
    if cfg.cap_usd is not None and reserved > budget - 1e-12:
        notes.append(f"cap: spent {snapshot.spent_usd:.4f} + reserved {reserved:.4f} of {cfg.cap_usd:.4f}")
    kept = [i for i in live if i.id not in terminating]

    # within drain_horizon of the cap: stop idle machines, drain busy ones so their jobs hand back in time
    cap_near = False
    if cfg.cap_usd is not None:
        ahead = drain_horizon(cfg)
        extra = {i.id: worst_case_usd(i, now + ahead, cfg, stop_now=False) + i.price_ceiling_usd_h * ahead / 3600
                 - reserve[i.id] for i in kept}
        projected = reserved + sum(extra.values())
        for inst in sorted(kept, key=lambda i: _victim_order(i, node_of)):
            if projected <= budget:
                break
            cap_near = True
            projected -= extra[inst.id]
            node = node_of.get(inst.id)
            if inst.price_ceiling_usd_h <= 0:
                continue
            if node is None or not node.busy:
                stop(inst, CAP)
            elif not node.draining:
                draining[node.node_id] = CAP
        if cap_near:
            notes.append("cap near: draining, no launches")
        kept = [i for i in kept if i.id not in terminating]

    # 3. scale in: a drained node that went idle is stopped
    for inst in kept:
        node = node_of.get(inst.id)
        if node is not None and node.draining and not node.busy:
            stop(inst, "drained and idle")
    kept = [i for i in kept if i.id not in terminating]
    alive = len(kept)

    # 4. who takes the queue: idle free nodes, idle paid nodes, booting instances; the rest wants launches
    queue = sorted(snapshot.queue, key=lambda w: (-w.priority, w.queued_at))
    pools = _capacity(snapshot, kept, node_of, draining)
    unserved = []
    for k, w in enumerate(queue):
        if not (pools["free_idle"] or pools["paid_idle"] or pools["booting"]):
            unserved += queue[k:]  # nothing left to take work: a long queue costs no more than this
            break
        if not _take(pools, w):
            unserved.append(w)
    unserved = [w for w in unserved if not w.awaiting_requeue]  # demand that launches once it is queued
    spare = {n.node_id for n in pools["paid_idle"] + pools["free_idle"]}  # idle and not wanted by the queue
    for inst in sorted(kept, key=lambda i: _idle_order(i, node_of)):
        node = node_of.get(inst.id)
        if alive <= cfg.min_nodes:
            break
        if node is None or node.node_id not in spare or node.idle_since is None:
            continue
        if now - node.idle_since >= cfg.idle_s and bills_more_later(inst, now, cfg):
            draining[node.node_id] = IDLE  # drained first (the actions' order), so it takes no job meanwhile
            stop(inst, IDLE)
            alive -= 1

    launches = _launches(snapshot, now, unserved, alive, budget - reserved, cap_near, notes)
    reserved += sum(launch.reserve_usd for launch in launches)
    decision.actions.extend(Drain(n, reason) for n, reason in sorted(draining.items()))
    decision.actions.extend(Terminate(i, reason) for i, reason in terminating.items())
    decision.actions.extend(launches)
    decision.reserved_usd = reserved
    return decision


def _nodes_by_instance(nodes: tuple[NodeView, ...], instances: list[Instance]) -> dict[str, NodeView]:
    """Instance id -> its registered node (joined by ``NodeView.instance_id``, else by the launch's node id)."""
    by_id = {n.node_id: n for n in nodes}
    by_instance = {n.instance_id: n for n in nodes if n.instance_id is not None}
    out = {}
    for inst in instances:
        node = by_instance.get(inst.id) or (by_id.get(inst.node_id) if inst.node_id else None)
        if node is not None:
            out[inst.id] = node
    return out


def _victim_order(inst: Instance, node_of: dict[str, NodeView]):
    """Which instance to stop first: unregistered or idle before busy, then the dearest, then the newest."""
    node = node_of.get(inst.id)
    busy = node is not None and node.busy
    return (busy, -inst.price_ceiling_usd_h, -inst.launched_at, inst.id)


def _idle_order(inst: Instance, node_of: dict[str, NodeView]):
    """Which idle instance to retire first (``min_nodes`` keeps the rest): the longest idle, then the dearest."""
    node = node_of.get(inst.id)
    since = node.idle_since if node is not None and node.idle_since is not None else math.inf
    return (since, -inst.price_ceiling_usd_h, -inst.launched_at, inst.id)


def _capacity(snapshot: Snapshot, kept: list[Instance], node_of: dict[str, NodeView],
              draining: dict[str, str]) -> dict:
    """Idle nodes and booting instances that can take queued work, in the order they should take it."""
    launched = {n.node_id for n in node_of.values()}
    free_idle = [n for n in snapshot.nodes if n.node_id not in launched and n.instance_id is None
                 and not n.busy and not n.draining]
    paid_idle, booting = [], []
    for inst in kept:
        node = node_of.get(inst.id)
        if node is None:
            booting.append(inst)
        elif not node.busy and not node.draining and node.node_id not in draining:
            (free_idle if inst.price_ceiling_usd_h <= 0 else paid_idle).append(node)
    return {"free_idle": free_idle, "paid_idle": paid_idle, "booting": booting, "gpus": snapshot.gpus}


def _take(pools: dict, work: QueuedWork) -> bool:
    """Give ``work`` the first capacity able to run it (CPU work prefers nodes without a GPU)."""
    gpus = pools["gpus"]
    for pool in ("free_idle", "paid_idle"):
        nodes = pools[pool]
        fits = [n for n in nodes if n.gpu or not work.gpu]
        if fits:
            best = min(fits, key=lambda n: n.gpu) if not work.gpu else fits[0]
            nodes.remove(best)
            return True
    fits = [i for i in pools["booting"] if not work.gpu or gpus.get(i.type, 1) > 0]
    if fits:
        best = min(fits, key=lambda i: gpus.get(i.type, 1) > 0) if not work.gpu else fits[0]
        pools["booting"].remove(best)
        return True
    return False


def _avoided(snapshot: Snapshot, now: float) -> tuple[set, set, set, float]:
    """Recent failures: (type, zone, market) without capacity, (type, market) over quota, types that never
    registered, and until when throttling pauses launches."""
    cfg = snapshot.config
    no_capacity, over_quota, unregistered = set(), set(), set()
    throttles = sorted(f.at for f in snapshot.failures if f.kind == "throttled" and now - f.at < cfg.avoid_s)
    for f in snapshot.failures:
        age = now - f.at
        market = Market(f.market).value
        if f.kind == "capacity" and age < cfg.capacity_avoid_s:
            no_capacity.add((f.type, f.zone, market))
        elif f.kind == "quota" and age < cfg.avoid_s:
            over_quota.add((f.type, market))
        elif f.kind == "never-registered" and age < cfg.avoid_s:
            unregistered.add(f.type)
    paused_until = -math.inf
    if throttles:
        backoff = min(cfg.tick_s * 2 ** (len(throttles) - 1), THROTTLE_BACKOFF_MAX_S)
        paused_until = throttles[-1] + backoff
    return no_capacity, over_quota, unregistered, paused_until


def candidates(snapshot: Snapshot, now: float, on_demand: bool) -> list[Candidate]:
    """The allowed launch choices, best first: free, then spot, then (if allowed) on-demand; each by unit cost."""
    cfg = snapshot.config
    no_capacity, over_quota, unregistered, _ = _avoided(snapshot, now)
    types = cfg.instance_types or _default_types(snapshot)
    zones = cfg.zones or (None,)
    out = []
    for type_ in types:
        if type_ in unregistered:
            continue
        throughput = snapshot.throughput.get(type_) or snapshot.priors.get(type_) or 1.0
        markets = [Market.STATIC]
        if cfg.spot:
            markets.append(Market.SPOT)
        if on_demand or not cfg.spot:
            markets.append(Market.ON_DEMAND)
        for market in markets:
            price = snapshot.prices.get((type_, market.value))
            ceiling = ceiling_of(snapshot, type_, market)
            if price is None or ceiling is None or (type_, market.value) in over_quota:
                continue
            if cfg.cap_usd is None and ceiling > 0:
                continue  # no cap: only free machines may be launched
            for zone in zones:
                if (type_, zone, market.value) in no_capacity or (zone is not None and
                                                                   (type_, None, market.value) in no_capacity):
                    continue
                out.append(Candidate(type_, market, zone, price, ceiling, price / throughput,
                                     snapshot.gpus.get(type_, 1) > 0))
    rank = {Market.STATIC: 0, Market.SPOT: 1, Market.ON_DEMAND: 2}
    out.sort(key=lambda c: (c.ceiling > 0, rank[c.market], c.unit_cost, c.type, c.zone or ""))
    return out


def _default_types(snapshot: Snapshot) -> tuple[str, ...]:
    provider = snapshot.config.provider
    if provider in ("local", "slurm"):
        return (provider,)
    return tuple(sorted({t for t, m in snapshot.prices if m != Market.STATIC.value}))


def _launches(snapshot: Snapshot, now: float, unserved: list[QueuedWork], alive: int, budget: float,
              cap_near: bool, notes: list[str]) -> list[Launch]:
    cfg = snapshot.config
    room = min(cfg.max_launch_per_tick, cfg.max_nodes - alive)
    wanted = list(unserved)
    wanted += [None] * max(0, cfg.min_nodes - alive - len(wanted))  # None: a node for min_nodes, any type
    if not wanted or room <= 0:
        if wanted and room <= 0:
            notes.append(f"{len(wanted)} waiting, at max_nodes {cfg.max_nodes}")
        return []
    if cap_near:
        return []
    _, _, _, paused_until = _avoided(snapshot, now)
    if now < paused_until:
        notes.append(f"throttled: no launches until {paused_until:.0f}")
        return []
    spot_failures = sum(1 for f in snapshot.failures if Market(f.market) == Market.SPOT and
                        f.kind in ("capacity", "quota") and now - f.at < cfg.avoid_s)
    oldest = min((w.queued_at for w in unserved), default=now)
    on_demand = (spot_failures >= cfg.spot_failures_before_on_demand or
                 now - oldest >= cfg.spot_wait_before_on_demand_s)
    choices = candidates(snapshot, now, on_demand)
    launches: list[Launch] = []
    for work in wanted:
        if len(launches) >= room:
            break
        fits = [c for c in choices if work is None or c.gpu or not work.gpu]
        chosen = None
        for c in fits:
            worst = launch_worst_case_usd(c.ceiling, cfg)
            needed = worst + c.ceiling * LAUNCH_RUNWAY_S / 3600.0
            if needed <= budget:
                chosen = (c, worst, needed)
                break
        if chosen is None:
            if fits:
                notes.append("cap: no launch fits the budget left")
            elif cfg.cap_usd is None:
                notes.append("no cap set: only machines that cost nothing are launched")
            else:
                notes.append(f"no allowed type can run {'GPU' if work is not None and work.gpu else 'this'} work now")
            continue
        c, worst, needed = chosen
        budget -= needed
        node_id = f"{c.type}-{int(now * 1000)}-{len(launches)}"
        request = LaunchRequest(c.type, c.market, c.ceiling, node_id, c.zone)
        reason = "min_nodes" if work is None else f"{work.kind} {work.job_id} (priority {work.priority})"
        launches.append(Launch(request, worst, reason))
    return launches


def failure_kind(error: Exception) -> str:
    """The ``LaunchFailure.kind`` a provider error stands for (the controller records it)."""
    from dlorch.orchestrator.fleet.model import CapacityError, QuotaError, ThrottledError

    if isinstance(error, CapacityError):
        return "capacity"
    if isinstance(error, QuotaError):
        return "quota"
    if isinstance(error, ThrottledError):
        return "throttled"
    return "capacity"


__all__ = ["step", "candidates", "bills_more_later", "worst_case_usd", "launch_worst_case_usd", "ceiling_of", "failure_kind",
           "Candidate", "LaunchFailure"]
