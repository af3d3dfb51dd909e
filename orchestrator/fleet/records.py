"""The fleet's records in the ledger: launched instances (with their billing), launch failures, work rates.

The ledger, not the provider, says what this deployment launched: an instance record is written with its
intent (node id, type, market, price ceiling, reserve) BEFORE the provider is asked to launch, so an
orchestrator that restarts knows every launch it may have made, re-adopts the machine by node id and
launches nothing twice. Billing is read off the same records: billed from the provider's launch time to
its end (the termination time the provider reports, else the first tick that no longer lists the
machine), at least the billing minimum, rounded up to the billing granule. The hard cap counts each second
at the price the provider reported for it (a spot price from when it took effect to when it was read) and
at the price ceiling where no report covers it (before the first, after the latest, between two); cost
reports at the reported prices, each until the next (the price table's before the first). Keys: ``fleet/instances/<node id>``, ``fleet/failures/<ms>-<node id>``,
``fleet/rates/<type>``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dlorch.orchestrator.fleet.model import LaunchFailure, LaunchRequest, Market

INSTANCES = "fleet/instances"
FAILURES = "fleet/failures"
RATES = "fleet/rates"
IDLE = "fleet/idle"  # one record: node id -> since when it is idle, as the controller saw it


class State:
    """Where a launch stands (an instance record's ``state``)."""

    LAUNCHING = "launching"  # intent recorded, the provider asked (or about to be): no instance id known yet
    RUNNING = "running"  # the provider returned or lists the instance: it bills
    FAILED = "failed"  # the provider refused the launch: nothing bills
    ENDED = "ended"  # no longer listed by the provider: billing stopped at ``ended_at``


@dataclass
class InstanceRecord:
    """One launch of this deployment, from intent to end."""

    node_id: str
    provider: str
    type: str
    market: str  # Market value
    ceiling_usd_h: float  # the most it bills per hour (spend against the cap is counted at this)
    price_usd_h: float  # the expected price (the price table's): what cost reports use
    reserve_usd: float  # the worst case the policy reserved for it at launch
    requested_at: float
    zone: str | None = None
    reason: str = ""
    state: str = State.LAUNCHING
    instance_id: str | None = None
    launched_at: float | None = None  # billing start (the provider's launch time)
    terminate_at: float | None = None  # when the controller asked it to stop, and why
    terminate_reason: str = ""
    ended_at: float | None = None  # billing end: as the provider reports it, else the first tick it was not listed
    error: str | None = None
    # [[since, as_of, $/h], …]: a price the provider reported, in effect from ``since`` (when it took effect)
    # to at least ``as_of`` (when it was read)
    observed: list = dataclasses.field(default_factory=list)

    def observe(self, since: float | None, as_of: float, price_usd_h: float | None) -> bool:
        """Note a price the provider reports (``since``: when it took effect, None: unknown, taken as
        ``as_of``); returns whether the record changed."""
        if price_usd_h is None or not math.isfinite(price_usd_h) or price_usd_h < 0 or not math.isfinite(as_of):
            return False
        since = as_of if since is None or not math.isfinite(since) else min(since, as_of)
        last = self.observed[-1] if self.observed else None
        if last is not None and abs(last[2] - price_usd_h) < 1e-12 and since <= last[1]:
            if as_of <= last[1]:
                return False
            last[1] = as_of  # the same price, known for longer
            return True
        if last is not None:
            since = max(since, last[1])  # a report never rewrites what an earlier one established
        self.observed.append([since, as_of, float(price_usd_h)])
        return True

    @property
    def key(self) -> str:
        return f"{INSTANCES}/{self.node_id}"

    @property
    def open(self) -> bool:
        """Still launching or billing."""
        return self.state in (State.LAUNCHING, State.RUNNING)

    def request(self) -> LaunchRequest:
        return LaunchRequest(self.type, Market(self.market), self.ceiling_usd_h, self.node_id, self.zone)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "InstanceRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def billings(self, billing_min_s: float, granularity_s: float) -> list:
        """Its ``cost.BillingRecord``s at the prices it billed (cost reports): each reported price from when it
        took effect to the next, the price table's before the first; empty if it never started."""
        whole = self.billing(billing_min_s, granularity_s)
        if whole is None or not self.observed:
            return [] if whole is None else [whole]
        points = [(whole.start, self.price_usd_h)] + [(max(since, whole.start), p) for since, _, p in self.observed]
        return _segments(whole, points, whole.end)

    def cap_billings(self, billing_min_s: float, granularity_s: float, now: float) -> list:
        """Its billing as the hard cap counts it, up to ``now``: a reported price where it is known to have
        been in effect (from when it took effect to when it was read), the ceiling everywhere else."""
        whole = self.billing(billing_min_s, granularity_s, at_ceiling=True)
        if whole is None:
            return []
        end = whole.end
        if end is None:
            if now <= whole.start:
                return []
            seconds = now - whole.start
            if granularity_s > 0:
                seconds = math.ceil(seconds / granularity_s - 1e-9) * granularity_s
            end = whole.start + seconds
        points, t = [], whole.start
        for since, as_of, price in self.observed:
            if as_of <= t or since >= end:
                continue
            if since > t:
                points.append((t, self.ceiling_usd_h))
            points.append((max(since, t), price))
            t = min(as_of, end)
        points.append((t, self.ceiling_usd_h))
        return _segments(whole, points, end)

    def billing(self, billing_min_s: float, granularity_s: float, at_ceiling: bool = False):
        """Its ``cost.BillingRecord`` (None if it never started): at its expected price, or at its ceiling
        (the cap's count). An ended instance bills at least ``billing_min_s`` from launch."""
        from dlorch.orchestrator.fleet.cost import BillingRecord, billed_end

        if self.launched_at is None:
            return None
        end = None if self.ended_at is None else billed_end(self.launched_at, self.ended_at, billing_min_s,
                                                              granularity_s)
        return BillingRecord(instance_id=self.instance_id or self.node_id, type=self.type, market=self.market,
                             price_usd_h=self.ceiling_usd_h if at_ceiling else self.price_usd_h,
                             start=self.launched_at, end=end, node_id=self.node_id, provider=self.provider)


def _segments(whole, points: list[tuple[float, float]], end: float | None) -> list:
    """``whole`` cut at ``points`` ((from, $/h), ascending), each piece at its price, up to ``end``."""
    out = []
    for k, (start, price) in enumerate(points):
        stop = points[k + 1][0] if k + 1 < len(points) else end
        if end is not None:
            if start >= end:
                break
            stop = end if stop is None else min(stop, end)
        if stop is not None and stop <= start:
            continue
        out.append(dataclasses.replace(whole, price_usd_h=price, start=start, end=stop))
    return out


def period_start(now: float, period_s: float) -> float:
    """The start of the cap period holding ``now``: periods are aligned to the epoch (1d: midnight UTC)."""
    return math.floor(now / period_s) * period_s


def spent_usd(records: list[InstanceRecord], start: float, now: float, billing_min_s: float,
              granularity_s: float) -> float:
    """Billed since ``start``: what the hard cap is held against (an ended instance's unused billing minimum
    included). Seconds at a price the provider reported count at it; the rest at the price ceiling."""
    from dlorch.orchestrator.fleet import cost

    billing = [b for r in records for b in r.cap_billings(billing_min_s, granularity_s, now)]
    return cost.spent_usd(billing, start, now, granularity_s)


def failure_to_json(f: LaunchFailure) -> dict:
    return {"type": f.type, "zone": f.zone, "market": Market(f.market).value, "at": f.at, "kind": f.kind}


def failure_from_json(d: dict) -> LaunchFailure:
    return LaunchFailure(type=str(d["type"]), zone=d.get("zone"), market=Market(d["market"]), at=float(d["at"]),
                         kind=str(d["kind"]))


@dataclass
class WorkRate:
    """Work a node type did under leases: training epochs over the seconds they took (for the policy's
    throughput, price per unit of work)."""

    type: str
    work: float = 0.0
    seconds: float = 0.0

    @property
    def per_hour(self) -> float:
        return 3600.0 * self.work / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "WorkRate":
        return cls(type=str(d["type"]), work=float(d.get("work", 0.0)), seconds=float(d.get("seconds", 0.0)))


def throughput(rates: dict[str, WorkRate], priors: dict[str, float], min_seconds: float = 60.0) -> dict[str, float]:
    """Measured throughput per type in the price table's unit (1.0 = one T4).

    A type's measured rate (epochs per hour) says how fast it is relative to another measured type, not in
    the price table's unit: the rates are scaled so that, over the measured types, they sum to the priors.
    With one type measured that is its prior; with several, their ratio is what was measured.
    """
    measured = {t: r.per_hour for t, r in rates.items() if r.seconds >= min_seconds and r.per_hour > 0}
    if not measured:
        return {}
    prior_sum = sum(priors.get(t, 1.0) for t in measured)
    scale = prior_sum / sum(measured.values())
    return {t: v * scale for t, v in measured.items()}


def node_fleet_info(ledger, now: float) -> dict[str, dict]:
    """Per node id: what the fleet knows of it (``dlorch nodes``): kind (the provider, or ``static`` for an
    agent dlorch did not launch), type, market, $/h, instance id, and seconds idle."""
    out: dict[str, dict] = {}
    for d in ledger.records(INSTANCES):
        try:
            r = InstanceRecord.from_json(d)
        except (TypeError, ValueError):
            continue
        price = r.observed[-1][2] if r.observed else r.price_usd_h  # the provider's latest report, else the table's
        out[r.node_id] = {"kind": r.provider, "type": r.type, "market": r.market, "price_usd_h": price,
                          "instance_id": r.instance_id, "instance_state": r.state}
    idle = ledger.record(IDLE) or {}
    for node_id, since in idle.items():
        if isinstance(since, (int, float)):
            out.setdefault(node_id, {"kind": "static"})["idle_s"] = max(0.0, now - since)
    return out
