"""Simulated days of an elastic EC2 fleet: dlorch's autoscaling policy against three baselines, under a cost cap.

Every day (00:00 to 24:00 UTC, one cap period, an empty fleet at midnight) is seeded and replayed for each
policy: bursts of train and predict jobs between 07:00 and 20:00, spot prices with spikes (above the
on-demand price a spike interrupts the type's spot machines), background spot interruptions, capacity
outages and random capacity and throttling errors, boot and registration delays, 1 % of machines whose
agent never registers, termination latency, per-second billing with a 60 s minimum (the world:
bench/cost_sim_world.py).

Policies:
  dlorch        orchestrator/fleet/policy.step on a simulated clock, every tick_s, on snapshots built from
                what the ledger holds (instances recorded, failures, measured throughput, spend at the
                spot prices read at every tick, as the controller counts it); one orchestrator crash a day
                loses the launch it was recording (a leak the policy must find)
  clairvoyant   knows every arrival: machines ready when work arrives, stopped when no work comes within
                a boot time; the true throughput and spot price; no cap
  always_on     max_nodes of the cheapest type all day; no cap
  idle_timeout  Ray-like: a machine per queued job, stopped after 5 min idle; no cap
The baselines stop a machine whose agent has not registered in 10 min, as dlorch does.

Measured per policy: cost_usd (all days), cap_violations (days whose spend crossed the cap), wait_mean_s and
wait_p95_s (arrival to first start), unfinished jobs at midnight and work done, and where the paid
node-seconds went, as shares of them that sum to 1 with the leased share:
  idle_share      a registered node could work and held no job: waiting for work, idle_s before scale-in,
                  a leaked machine until found (what a policy chooses to pay for)
  boot_share      billing start to the agent's registration (the whole billed time of a machine whose agent
                  never registers): paid, and no policy can use it, though launching less wastes less of it
  stop_share      terminate (or an interruption) to billing end, the unused billing minimum included
  no_lease_share  the three together: every paid second under no lease (``orchestrator/fleet/cost.py``'s
                  idle line, which is what ``dlorch cost`` reports)

    python bench/cost_sim.py [--days 1000] [--seed 1] [--cap 5] [--cap-counts prices|ceilings] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from cost_sim_world import BILLING_MIN_S, DAY, PRICES, TYPES, Day, Machine, World  # noqa: E402

from dlorch.orchestrator.fleet import policy  # noqa: E402
from dlorch.orchestrator.fleet.cost import attribute  # noqa: E402
from dlorch.orchestrator.fleet.model import (  # noqa: E402
    Drain, Instance, InstanceState, Launch, LaunchFailure, Market, NodeView, QueuedWork,
    ScaleConfig, Snapshot, Terminate,
)

POLICIES = ("dlorch", "clairvoyant", "always_on", "idle_timeout")


# --- the policies -------------------------------------------------------------------------------------------

def cheapest(world: World, t: float, thr: dict[str, float], spot_price: bool) -> list[str]:
    def unit(type_):
        price = world.day.spot(type_, t) if spot_price else PRICES.table[(type_, "spot")]
        return price / thr[type_]
    return sorted(TYPES, key=unit)


class Dlorch:
    """policy.step on snapshots of what the ledger holds; the controller's side written as the sim's."""

    name = "dlorch"

    def __init__(self, config: ScaleConfig, at_ceilings: bool = False):
        self.cfg, self.at_ceilings = config, at_ceilings
        self.measured: dict[str, float] = {}  # the ledger keeps measured throughput across days

    def start(self, world: World) -> None:
        world.measured = self.measured
        self.crashed = False

    def snapshot(self, world: World, t: float) -> Snapshot:
        instances, nodes, known = [], [], set()
        for m in world.machines.values():
            if m.end is not None:
                continue
            state = InstanceState.STOPPING if m.stop_asked is not None else (
                InstanceState.RUNNING if t >= m.running_at else InstanceState.PENDING)
            instances.append(Instance(m.id, "ec2", m.type, m.market, m.ceiling, state, m.launched, m.node_id))
            if m.known:
                known.add(m.id)
            if m.registered:
                nodes.append(NodeView(m.node_id, m.id, m.job is not None, m.idle_since, m.draining,
                                      PRICES.gpus.get(m.type, 1) > 0))
        queue = tuple(QueuedWork(j.id, j.kind, j.gpu, j.priority, j.arrival) for j in world.queue)
        world.failures = [f for f in world.failures if t - f.at < self.cfg.avoid_s]
        return Snapshot(self.cfg, queue, tuple(instances), frozenset(known), tuple(nodes), PRICES.table,
                        dict(self.measured), world.spent_at_ceilings(t) if self.at_ceilings else world.spent(t),
                        0.0, tuple(world.failures),
                        PRICES.ceilings, PRICES.gpus, PRICES.priors)

    def quiet(self, world: World, t: float, until: float) -> bool:
        """Whether step would return nothing at every tick before ``until`` (so the sim may skip them)."""
        if world.queue:
            return False
        live = world.live()
        if any(not m.registered or m.job is None or m.draining or m.stop_asked is not None for m in live):
            return False
        if len(live) < self.cfg.min_nodes:
            return False
        margin = sum(m.ceiling for m in live) * (until - t + 2 * policy.drain_horizon(self.cfg) + 600) / 3600
        return world.spent(t) + margin < self.cfg.cap_usd

    def tick(self, world: World, t: float) -> None:
        decision = policy.step(self.snapshot(world, t), t)
        crash = not self.crashed and t >= world.day.crash_at
        for action in decision.actions:
            if isinstance(action, Terminate):
                m = world.machines[action.instance_id]
                world.terminate(t, m)
                world.stops[action.reason] = world.stops.get(action.reason, 0) + 1
                if action.reason == policy.NEVER_REGISTERED:
                    world.failures.append(LaunchFailure(m.type, None, m.market, t, "never-registered"))
            elif isinstance(action, Drain):
                for m in world.live():
                    if m.node_id == action.node_id:
                        world.drain(t, m)
            elif isinstance(action, Launch):
                r = action.request
                m = world.launch(t, r.type, r.market, r.node_id, r.price_ceiling_usd_h)
                if isinstance(m, str):
                    world.failures.append(LaunchFailure(r.type, r.zone, r.market, t, m))
                elif crash:
                    m.known = False  # crashed after the launch, before the ledger recorded it
        if crash and any(isinstance(a, Launch) for a in decision.actions):
            self.crashed = True
        world.dispatch(t)


class Clairvoyant:
    name = "clairvoyant"
    LEAD_S = 120.0  # a machine is started this long before the work it is for arrives

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes

    def start(self, world: World) -> None:
        self.arrivals = sorted(j.arrival for j in world.jobs)

    def quiet(self, world, t, until):
        return False

    def coming(self, t: float, horizon: float) -> int:
        import bisect
        return bisect.bisect_right(self.arrivals, t + horizon) - bisect.bisect_right(self.arrivals, t)

    def tick(self, world: World, t: float) -> None:
        live = self.reap(world, t)
        idle = [m for m in live if m.registered and m.job is None]
        booting = [m for m in live if not m.registered]
        need = len(world.queue) + self.coming(t, self.LEAD_S) - len(idle) - len(booting)
        if need < 0:
            for m in sorted(idle, key=lambda m: -m.ceiling)[:-need]:
                world.terminate(t, m)
        order = cheapest(world, t, world.true_thr, spot_price=True)
        room = self.max_nodes - len(live)
        for _ in range(max(0, min(need, room))):
            if not self._launch(world, t, order):
                break
        world.dispatch(t)

    @staticmethod
    def reap(world: World, t: float) -> list[Machine]:
        """Stops machines whose agent has not registered in 10 min (as Ray's node start timeout); the rest."""
        live = [m for m in world.live() if m.stop_asked is None]
        for m in live:
            if not m.registered and t - m.launched > 600:
                world.terminate(t, m)
        return [m for m in live if m.stop_asked is None]

    @staticmethod
    def _launch(world: World, t: float, order: list[str]) -> bool:
        for market in (Market.SPOT, Market.ON_DEMAND):
            for type_ in order:
                m = world.launch(t, type_, market, f"n-{len(world.machines)}", PRICES.ceiling(type_, market))
                if not isinstance(m, str):
                    return True
                if m == "throttled":
                    return False
        return False


class AlwaysOn(Clairvoyant):
    name = "always_on"

    def start(self, world):
        pass

    def tick(self, world: World, t: float) -> None:
        live = self.reap(world, t)
        order = cheapest(world, t, {k: PRICES.priors[k] for k in TYPES}, spot_price=False)
        for _ in range(self.max_nodes - len(live)):
            if not self._launch(world, t, order):
                break
        world.dispatch(t)

    def quiet(self, world, t, until):
        live = [m for m in world.live() if m.stop_asked is None]
        return len(live) >= self.max_nodes and all(m.registered for m in live)


class IdleTimeout(Clairvoyant):
    name = "idle_timeout"
    IDLE_S = 300.0

    def start(self, world):
        pass

    def tick(self, world: World, t: float) -> None:
        live = self.reap(world, t)
        idle = [m for m in live if m.registered and m.job is None]
        booting = [m for m in live if not m.registered]
        for m in idle:
            if t - m.idle_since >= self.IDLE_S:
                world.terminate(t, m)
        need = len(world.queue) - len(idle) - len(booting)
        order = cheapest(world, t, {k: PRICES.priors[k] for k in TYPES}, spot_price=False)
        for _ in range(max(0, min(need, self.max_nodes - len(live)))):
            if not self._launch(world, t, order):
                break
        world.dispatch(t)

    def quiet(self, world, t, until):
        live = world.live()
        return not world.queue and all(m.registered and m.job is not None and m.stop_asked is None for m in live)


def simulate_day(driver, day: Day, true_thr: dict, max_nodes: int, tick_s: float) -> dict:
    world = World(day, true_thr, max_nodes)
    driver.start(world)
    t = 0.0
    while t < DAY:
        world.run_until(t)
        driver.tick(world, t)
        nxt = t + tick_s
        if world.events and not world.queue and driver.quiet(world, t, world.events[0][0]):
            event = world.events[0][0]
            lead = Clairvoyant.LEAD_S if isinstance(driver, Clairvoyant) and driver.name == "clairvoyant" else 0
            nxt = max(nxt, math.floor((event - lead) / tick_s) * tick_s)
        elif not world.events and not world.live():
            break
        t = nxt
    world.close(min(t, DAY))
    report = attribute(world.billing, world.leases, now=math.inf)
    boot_s, stop_s = world.seconds()
    waits = [j.first_start - j.arrival for j in world.jobs if j.first_start is not None]
    return {"cost": world.closed_usd, "attributed": report.total_usd, "paid_s": report.paid_node_s,
            "idle_s": report.idle_node_s, "boot_s": boot_s, "stop_s": stop_s, "waits": waits,
            "unfinished": sum(1 for j in world.jobs if j.finished is None),
            "unstarted": sum(1 for j in world.jobs if j.first_start is None),
            "work": sum(j.done for j in world.jobs), "violation": world.closed_usd > day.cap + 1e-9,
            "stops": world.stops}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cap", type=float, default=5.0, help="cap per day in US dollars (dlorch's hard cap)")
    ap.add_argument("--max-nodes", type=int, default=8)
    ap.add_argument("--idle-s", type=float, default=30.0, help="dlorch's idle_s")
    ap.add_argument("--tick-s", type=float, default=30.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--cap-counts", choices=("prices", "ceilings"), default="prices",
                    help="what dlorch's cap counts as spent: the spot prices read (the controller's way) or "
                         "every second at the price ceiling (as if no price were reported)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    true_thr = {t: PRICES.priors[t] * rng.uniform(0.8, 1.2) for t in TYPES}
    cfg = ScaleConfig(provider="ec2", min_nodes=0, max_nodes=args.max_nodes, cap_usd=args.cap,
                      cap_period_s=DAY, instance_types=TYPES, idle_s=args.idle_s, tick_s=args.tick_s,
                      billing_min_s=BILLING_MIN_S)
    drivers = {"dlorch": Dlorch(cfg, at_ceilings=args.cap_counts == "ceilings"), "clairvoyant": Clairvoyant(args.max_nodes),
               "always_on": AlwaysOn(args.max_nodes), "idle_timeout": IdleTimeout(args.max_nodes)}
    names = [p for p in args.policies.split(",") if p]
    acc = {p: {"cost": 0.0, "attributed": 0.0, "paid_s": 0.0, "idle_s": 0.0, "boot_s": 0.0, "stop_s": 0.0,
               "waits": [], "unfinished": 0, "unstarted": 0, "stops": {},
               "work": 0.0, "violations": 0, "seconds": 0.0} for p in names}
    total_jobs = 0
    for index in range(args.days):
        day = Day(args.seed, index, args.cap)
        total_jobs += len(day.jobs)
        for p in names:
            started = time.perf_counter()
            r = simulate_day(drivers[p], day, true_thr, args.max_nodes, args.tick_s)
            a = acc[p]
            for k in ("cost", "attributed", "paid_s", "idle_s", "boot_s", "stop_s", "unfinished", "unstarted",
                      "work"):
                a[k] += r[k]
            a["waits"] += r["waits"]
            a["violations"] += r["violation"]
            for reason, n in r["stops"].items():
                a["stops"][reason] = a["stops"].get(reason, 0) + n
            a["seconds"] += time.perf_counter() - started
    out = {}
    for p in names:
        a = acc[p]
        share = (lambda s: round(s / a["paid_s"], 4) if a["paid_s"] else 0.0)
        out[p] = {"cost_usd": round(a["cost"], 2), "cap_violations": a["violations"],
                  "idle_share": share(a["idle_s"] - a["boot_s"] - a["stop_s"]),
                  "boot_share": share(a["boot_s"]), "stop_share": share(a["stop_s"]),
                  "no_lease_share": share(a["idle_s"]),
                  "wait_mean_s": round(sum(a["waits"]) / max(1, len(a["waits"])), 1),
                  "wait_p95_s": round(percentile(a["waits"], 0.95), 1),
                  "unfinished_jobs": a["unfinished"], "unstarted_jobs": a["unstarted"],
                  "work_t4_hours": round(a["work"], 1),
                  "usd_per_t4_hour": round(a["cost"] / a["work"], 4) if a["work"] else None,
                  "attribution_gap": round(abs(a["attributed"] - a["cost"]) / max(a["cost"], 1e-9), 6),
                  "sim_seconds": round(a["seconds"], 1)}
        if a["stops"]:
            out[p]["terminations"] = dict(sorted(a["stops"].items()))
    meta = {"days": args.days, "seed": args.seed, "cap_usd_per_day": args.cap, "cap_counts": args.cap_counts,
            "max_nodes": args.max_nodes,
            "idle_s": args.idle_s, "tick_s": args.tick_s, "jobs": total_jobs,
            "prices_as_of": PRICES.as_of}
    print(f"{args.days} days, seed {args.seed}, cap ${args.cap:g}/day, max {args.max_nodes} nodes, "
          f"dlorch idle_s {args.idle_s:g}, tick {args.tick_s:g} s, {meta['jobs']} jobs; waits of started jobs")
    print(f"{'policy':<13} {'cost $':>9} {'x clairv.':>9} {'cap viol.':>9} {'idle':>6} {'boot':>6} {'stop':>6} "
          f"{'wait mean':>9} "
          f"{'wait p95':>9} {'unfinished':>10} {'work T4-h':>9} {'$/T4-h':>7}")
    base = out.get("clairvoyant", {}).get("cost_usd")
    for p, r in out.items():
        ratio = f"{r['cost_usd'] / base:.3f}" if base else "-"
        print(f"{p:<13} {r['cost_usd']:>9.2f} {ratio:>9} {r['cap_violations']:>9} {r['idle_share']:>6.1%} "
              f"{r['boot_share']:>6.1%} {r['stop_share']:>6.1%} "
              f"{r['wait_mean_s']:>8.0f}s {r['wait_p95_s']:>8.0f}s {r['unfinished_jobs']:>10} "
              f"{r['work_t4_hours']:>9.1f} {r['usd_per_t4_hour'] or 0:>7.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**out, "_meta": meta}, indent=1))
    return out


if __name__ == "__main__":
    main()
