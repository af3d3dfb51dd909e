"""The simulated world of bench/cost_sim.py: a seeded day's trace (bursts of jobs, the spot market,
capacity outages, the orchestrator's crash) and one policy's run of it on a simulated EC2 fleet.

``Day`` is the trace, the same for every policy. ``World`` is the cloud and the orchestrator around a
policy: launches that fail as EC2's do (capacity, spot price above the ceiling, throttling), boot and
registration delays, agents that never register, spot interruptions, termination latency, per-second
billing with a 60 s minimum, the queue's dispatch to idle nodes, leases and billing records for
``orchestrator/fleet/cost.py``. Jobs checkpoint every 5 min of run time; a drained node hands its job
back with its progress, a killed one loses what it did since its last checkpoint.

A machine's paid seconds fall in four parts (``World.seconds``): booting (billing start to its agent's
registration, or to its stop if it never registered), stopping (stop asked to billing end, the unused
billing minimum included), leased (a job held) and idle (registered, able to work, no job).
"""

from __future__ import annotations

import heapq
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dlorch.orchestrator.fleet.cost import BillingRecord, LeaseInterval  # noqa: E402
from dlorch.orchestrator.fleet.model import LaunchFailure, Market  # noqa: E402
from dlorch.orchestrator.fleet.prices import load_prices  # noqa: E402

DAY = 86_400.0
TYPES = ("g4dn.xlarge", "g5.xlarge", "g6.xlarge", "c6i.2xlarge")
CHECKPOINT_S = 300.0
HANDBACK_S = 30.0
BILLING_MIN_S = 60.0
PRICES = load_prices(env={})


@dataclass
class Job:
    id: str
    kind: str
    gpu: bool
    priority: int
    arrival: float
    units: float  # T4-hours
    done: float = 0.0
    first_start: float | None = None
    finished: float | None = None


@dataclass
class Machine:
    id: str
    type: str
    market: Market
    ceiling: float
    launched: float
    running_at: float
    registers_at: float  # inf: its agent never registers
    node_id: str
    known: bool = True
    registered: bool = False
    draining: bool = False
    stop_asked: float | None = None
    end: float | None = None  # when it stopped (interrupted, or shut down after a terminate)
    billed: float | None = None  # billing end: ``end``, or the billing minimum if that is later
    job: Job | None = None
    run_start: float = 0.0
    run_token: int = 0
    idle_since: float | None = None


class Day:
    """One seeded day: the work, the spot market, outages and the crash, the same for every policy."""

    def __init__(self, seed: int, index: int, cap: float):
        rng = random.Random(seed * 1_000_003 + index)
        self.index, self.cap, self.seed = index, cap, rng.randrange(2**31)
        self.jobs: list[tuple] = []
        for b in range(rng.randint(2, 7)):
            at = rng.uniform(7 * 3600, 20 * 3600)
            for k in range(min(1 + int(rng.expovariate(1 / 5)), 25)):
                arrival = at + rng.uniform(0, 1200)
                r = rng.random()
                if r < 0.4:
                    job = ("train", True, 0, rng.uniform(0.25, 1.5))
                elif r < 0.9:
                    job = ("predict", True, 1, rng.uniform(0.03, 0.25))
                else:
                    job = ("predict-cpu", False, 1, rng.uniform(0.02, 0.1))
                self.jobs.append((f"d{index}-b{b}-j{k}", *job, arrival))
        self.jobs.sort(key=lambda j: j[-1])
        self.spot_base = {t: PRICES.table[(t, "spot")] * rng.uniform(0.85, 1.15) for t in TYPES}
        self.spikes = {}  # type -> (start, end, multiplier)
        self.outages = {}  # type -> (start, end): no spot capacity
        for t in TYPES:
            if rng.random() < 0.25:
                s = rng.uniform(0, DAY)
                self.spikes[t] = (s, s + rng.uniform(3600, 3 * 3600), rng.uniform(1.5, 3.5))
            if rng.random() < 0.3:
                s = rng.uniform(6 * 3600, 20 * 3600)
                self.outages[t] = (s, s + rng.uniform(3600, 4 * 3600))
        self.crash_at = rng.uniform(0, DAY)

    def spot(self, type_: str, t: float) -> float:
        s = self.spikes.get(type_)
        base = self.spot_base[type_]
        return base * s[2] if s and s[0] <= t < s[1] else base

    def price_integral(self, type_: str, market: Market, a: float, b: float) -> float:
        if b <= a:
            return 0.0
        if market != Market.SPOT:
            return PRICES.table[(type_, "on-demand")] * (b - a) / 3600
        base, s = self.spot_base[type_], self.spikes.get(type_)
        usd = base * (b - a)
        if s:
            usd += base * (s[2] - 1) * max(0.0, min(b, s[1]) - max(a, s[0]))
        return usd / 3600


class World:
    """One policy's run of one day: machines, queue, events, billing and leases."""

    def __init__(self, day: Day, true_thr: dict[str, float], max_nodes: int):
        self.day, self.true_thr, self.max_nodes = day, true_thr, max_nodes
        self.rng = random.Random(day.seed)
        self.jobs = [Job(i, k, g, p, a, u) for i, k, g, p, u, a in day.jobs]
        self.queue: list[Job] = []
        self.machines: dict[str, Machine] = {}
        self.events: list = []
        self.seq = 0
        self.closed_usd = 0.0
        self.billing: list[BillingRecord] = []
        self.leases: list[LeaseInterval] = []
        self.failures: list[LaunchFailure] = []
        self.measured: dict[str, float] = {}
        self.stops: dict[str, int] = {}  # dlorch's terminations by reason
        for job in self.jobs:
            self.push(job.arrival, "arrive", job)

    def push(self, t, kind, *payload):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    # --- the provider ---------------------------------------------------------------------------------------
    def launch(self, t: float, type_: str, market: Market, node_id: str, ceiling: float) -> Machine:
        """A machine, or a ProviderError-like failure kind as a string."""
        rng, day = self.rng, self.day
        if rng.random() < 0.02:
            return "throttled"
        if market == Market.SPOT:
            out = day.outages.get(type_)
            if (out and out[0] <= t < out[1]) or day.spot(type_, t) > ceiling or rng.random() < 0.05:
                return "capacity"
        m = Machine(f"i-{len(self.machines):05d}", type_, market, ceiling, t, t + rng.uniform(10, 40),
                    math.inf if rng.random() < 0.01 else t + rng.uniform(60, 150), node_id)
        self.machines[m.id] = m
        if m.registers_at < math.inf:
            self.push(m.registers_at, "register", m)
        if market == Market.SPOT:
            self.push(t + rng.expovariate(0.02 / 3600), "interrupt", m)  # ~2 % per machine-hour
            s = day.spikes.get(type_)
            if s and day.spot_base[type_] * s[2] > ceiling and s[0] > t:
                self.push(s[0], "interrupt", m)
        return m

    def terminate(self, t: float, m: Machine) -> None:
        if m.stop_asked is not None or m.end is not None:
            return
        m.stop_asked = t
        self._lose_job(t, m, keep_all=False)
        m.registered = False
        self.push(t + self.rng.uniform(1, 10), "billing_end", m)  # billing stops at shutting-down

    def drain(self, t: float, m: Machine) -> None:
        if m.draining or m.stop_asked is not None:
            return
        m.draining = True
        if m.job is not None:
            self.push(t + HANDBACK_S, "handback", m, m.run_token)

    def live(self) -> list[Machine]:
        return [m for m in self.machines.values() if m.end is None]

    # --- events ----------------------------------------------------------------------------------------------
    def run_until(self, t_end: float) -> None:
        while self.events and self.events[0][0] <= t_end:
            t, _, kind, payload = heapq.heappop(self.events)
            getattr(self, "_on_" + kind)(t, *payload)

    def _on_arrive(self, t, job):
        self.queue.append(job)
        self.dispatch(t)

    def _on_register(self, t, m):
        if m.stop_asked is None and m.end is None:
            m.registered, m.idle_since = True, t
            self.dispatch(t)

    def _on_finish(self, t, m, token):
        if m.run_token != token or m.job is None:
            return
        job = m.job
        job.done, job.finished = job.units, t
        self.leases.append(LeaseInterval(job.id, str(token), m.node_id, m.run_start, t))
        self.measured[m.type] = self.true_thr[m.type]
        m.job, m.idle_since = None, t
        self.dispatch(t)

    def _on_handback(self, t, m, token):
        if m.run_token == token and m.job is not None:
            self._lose_job(t, m, keep_all=True)
            self.dispatch(t)

    def _on_interrupt(self, t, m):
        if m.end is None and m.stop_asked is None:
            self._lose_job(t, m, keep_all=False)
            m.registered, m.stop_asked = False, t
            self._on_billing_end(t, m, interrupted=True)
            self.dispatch(t)

    def _on_billing_end(self, t, m, interrupted=False):
        if m.end is not None:
            return
        m.end = t
        if t <= m.running_at:
            return  # stopped while pending: EC2 bills from the running state on
        billed = t if interrupted else max(t, m.running_at + BILLING_MIN_S)
        m.billed = billed
        self.closed_usd += self.day.price_integral(m.type, m.market, m.running_at, billed)
        self._bill(m, billed)

    def _bill(self, m: Machine, billed: float) -> None:
        """Billing records: one per price segment (a spike is a segment), as the controller would write."""
        cuts = [m.running_at, billed]
        s = self.day.spikes.get(m.type)
        if m.market == Market.SPOT and s:
            cuts += [c for c in s[:2] if m.running_at < c < billed]
        cuts.sort()
        for a, b in zip(cuts, cuts[1:]):
            price = self.day.price_integral(m.type, m.market, a, b) * 3600 / (b - a)
            self.billing.append(BillingRecord(m.id, m.type, m.market.value, price, a, b, m.node_id))

    def _lose_job(self, t, m, keep_all: bool) -> None:
        job = m.job
        if job is None:
            return
        ran = t - m.run_start
        kept = ran if keep_all else math.floor(ran / CHECKPOINT_S) * CHECKPOINT_S
        job.done = min(job.units, job.done + kept * self.true_thr[m.type] / 3600)
        self.leases.append(LeaseInterval(job.id, str(m.run_token), m.node_id, m.run_start, t))
        m.job, m.idle_since = None, t
        m.run_token += 1
        self.queue.append(job)

    def dispatch(self, t: float) -> None:
        idle = [m for m in self.machines.values()
                if m.registered and m.job is None and not m.draining and m.stop_asked is None]
        if not idle or not self.queue:
            return
        self.queue.sort(key=lambda j: (-j.priority, j.arrival))
        for job in list(self.queue):
            fits = [m for m in idle if not job.gpu or PRICES.gpus.get(m.type, 1) > 0]
            if not fits:
                continue
            m = min(fits, key=lambda m: PRICES.gpus.get(m.type, 1) > 0) if not job.gpu else fits[0]
            idle.remove(m)
            self.queue.remove(job)
            job.first_start = t if job.first_start is None else job.first_start
            m.job, m.run_start, m.idle_since = job, t, None
            m.run_token += 1
            duration = (job.units - job.done) / self.true_thr[m.type] * 3600
            self.push(t + duration, "finish", m, m.run_token)
            if not idle:
                break

    def spent(self, t: float) -> float:
        """Billed so far: machines whose billing ended in full, running ones up to ``t`` in whole seconds."""
        usd = self.closed_usd
        for m in self.machines.values():
            if m.end is None and t > m.running_at:
                billed_to = m.running_at + math.ceil(t - m.running_at)  # whole seconds begun
                usd += self.day.price_integral(m.type, m.market, m.running_at, billed_to)
        return usd

    def spent_at_ceilings(self, t: float) -> float:
        """Spend counted as if no price were ever reported: every machine at its price ceiling from its launch
        (pending included) to its end (at least the billing minimum), a running one to ``t`` in whole seconds."""
        usd = 0.0
        for m in self.machines.values():
            if m.end is not None:
                hi = m.launched + math.ceil(max(m.end - m.launched, BILLING_MIN_S) - 1e-9)
            elif t > m.launched:
                hi = m.launched + math.ceil(t - m.launched - 1e-9)
            else:
                continue
            usd += m.ceiling * (hi - m.launched) / 3600
        return usd

    def seconds(self) -> tuple[float, float]:
        """Paid seconds booting and stopping, over all machines (after ``close``).

        Booting: billing start to the agent's registration, or to the stop if it came first (a machine whose
        agent never registers is booting until it is stopped). Stopping: the stop (or the billing start, if
        it was stopped while pending) to the billing end, the unused billing minimum included. No lease is
        held in either, so the idle seconds of ``cost.attribute`` less these are the seconds a registered
        node could work and had none.
        """
        boot = stop = 0.0
        for m in self.machines.values():
            if m.billed is None or m.billed <= m.running_at:
                continue
            stopped = m.stop_asked if m.stop_asked is not None else m.end
            boot += max(0.0, min(m.registers_at, stopped) - m.running_at)
            stop += m.billed - max(m.running_at, stopped)
        return boot, stop

    def close(self, t: float) -> None:
        for m in self.live():
            self.terminate(t, m)
        self.run_until(math.inf)


