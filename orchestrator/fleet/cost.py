"""Cost attribution (pure): what each job, candidate model, instance type and day cost, and what sat idle.

The controller stores two kinds of record in the ledger as JSON: a ``BillingRecord`` per paid instance
(its billed interval at its price) and a ``LeaseInterval`` per job attempt held on a node. ``attribute``
splits every billed second of an instance among the leases its node held at that second (evenly, if
more than one), and counts a second under no lease as idle: booting, waiting for work, draining, the
billing minimum after the machine stopped. Every line is a share of the same seconds, so per job plus idle,
per type and per day each sum to the fleet total.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

from dlorch.core.errors import BadInput

DAY_S = 86_400.0
NO_VARIANT = "-"


def billed_end(start: float, end: float, billing_min_s: float = 60.0, granularity_s: float = 1.0) -> float:
    """When billing of a machine that ran from ``start`` to ``end`` stops: the minimum, rounded up to granules."""
    seconds = max(end - start, billing_min_s)
    if granularity_s > 0:
        seconds = math.ceil(seconds / granularity_s - 1e-9) * granularity_s
    return start + seconds


@dataclass(frozen=True)
class BillingRecord:
    """One instance's billed interval at one price (a price change starts a new record)."""

    instance_id: str
    type: str
    market: str  # "spot", "on-demand", "static"
    price_usd_h: float
    start: float  # billing start, epoch seconds
    end: float | None = None  # billing end (billing minimum included); None: still billing
    node_id: str | None = None  # the dlorch node id its agent registered under
    provider: str = "ec2"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> BillingRecord:
        return _load(cls, data, numbers=("price_usd_h", "start"), optional_numbers=("end",))

    def seconds_until(self, now: float) -> tuple[float, float]:
        """The billed interval, clipped at ``now`` while it is still billing."""
        return self.start, (now if self.end is None else self.end)


@dataclass(frozen=True)
class LeaseInterval:
    """A job attempt held on a node, from its lease grant to its end (None: still held)."""

    job_id: str
    attempt: str  # the attempt's fencing token
    node_id: str
    start: float
    end: float | None = None
    variant: str | None = None  # the candidate model / configuration the attempt trained or ran

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LeaseInterval:
        return _load(cls, data, numbers=("start",), optional_numbers=("end",))


def _load(cls, data, numbers: tuple[str, ...], optional_numbers: tuple[str, ...]):
    if not isinstance(data, dict):
        raise BadInput(f"{cls.__name__} record must be a JSON object, got {type(data).__name__}")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInput(f"{cls.__name__} record has unknown field {unknown[0]!r}")
    for name in numbers + optional_numbers:
        value = data.get(name)
        if value is None and name in optional_numbers:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"{cls.__name__} record field {name!r} must be a number, got {value!r}")
    try:
        return cls(**data)
    except TypeError as e:
        raise BadInput(f"{cls.__name__} record is incomplete: {e}") from None


def spent_usd(records: Iterable[BillingRecord], since: float, now: float, granularity_s: float = 1.0) -> float:
    """What ``records`` billed from ``since`` on, as of ``now``: what the cap counts as spent.

    A stopped record counts whole (its billing minimum included, even if that runs past ``now``, since no
    instance is left to reserve it); a running one up to ``now`` in whole granules begun.
    """
    total = 0.0
    for r in records:
        if r.end is not None:
            hi = r.end
        elif now <= r.start:
            continue
        else:
            hi = r.start + (math.ceil((now - r.start) / granularity_s - 1e-9) * granularity_s
                            if granularity_s > 0 else now - r.start)
        lo = max(r.start, since)
        if hi > lo:
            total += r.price_usd_h * (hi - lo) / 3600.0
    return total


@dataclass
class CostReport:
    """Cost lines in US dollars; each family of lines sums to ``total_usd``."""

    total_usd: float = 0.0
    idle_usd: float = 0.0
    paid_node_s: float = 0.0
    idle_node_s: float = 0.0
    per_job: dict[str, float] = field(default_factory=dict)
    per_variant: dict[str, float] = field(default_factory=dict)  # leased cost by candidate model
    per_type: dict[str, float] = field(default_factory=dict)
    per_day: dict[str, float] = field(default_factory=dict)  # UTC date -> cost

    @property
    def idle_share(self) -> float:
        """Idle node-seconds over paid node-seconds."""
        return self.idle_node_s / self.paid_node_s if self.paid_node_s else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "idle_share": self.idle_share}

    def reconciles(self, tolerance: float = 0.01) -> bool:
        """Whether per job + idle, per type and per day each match the total within ``tolerance`` (relative)."""
        sums = (sum(self.per_job.values()) + self.idle_usd, sum(self.per_type.values()),
                sum(self.per_day.values()), sum(self.per_variant.values()) + self.idle_usd)
        bound = tolerance * max(self.total_usd, 1e-12)
        return all(abs(s - self.total_usd) <= bound for s in sums)


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def attribute(billing: Iterable[BillingRecord], leases: Iterable[LeaseInterval], now: float) -> CostReport:
    """Split every billed second among the leases held on its node then; the rest is idle."""
    report = CostReport()
    by_node: dict[str, list[LeaseInterval]] = defaultdict(list)
    for lease in leases:
        by_node[lease.node_id].append(lease)
    per_job, per_variant = defaultdict(float), defaultdict(float)
    per_type, per_day = defaultdict(float), defaultdict(float)
    for rec in billing:
        start, end = rec.seconds_until(now)
        if end <= start:
            continue
        rate = rec.price_usd_h / 3600.0
        # events: lease starts and ends and UTC midnights inside the billed interval
        cuts = {start, end}
        first_day = math.floor(start / DAY_S) + 1
        cuts.update(d * DAY_S for d in range(first_day, math.floor(end / DAY_S) + 1) if start < d * DAY_S < end)
        held = [lease for lease in by_node.get(rec.node_id, ()) if rec.node_id is not None]
        spans = []
        for lease in held:
            lo, hi = max(lease.start, start), min(now if lease.end is None else lease.end, end)
            if hi > lo:
                spans.append((lo, hi, lease))
                cuts.update((lo, hi))
        cuts = sorted(cuts)
        active_at = [[] for _ in range(len(cuts) - 1)]
        for lo, hi, lease in spans:
            for k in range(bisect.bisect_left(cuts, lo), bisect.bisect_left(cuts, hi)):
                active_at[k].append(lease)
        for k in range(len(cuts) - 1):
            seconds = cuts[k + 1] - cuts[k]
            usd = rate * seconds
            report.total_usd += usd
            report.paid_node_s += seconds
            per_type[rec.type] += usd
            per_day[day_of(cuts[k])] += usd
            active = active_at[k]
            if not active:
                report.idle_usd += usd
                report.idle_node_s += seconds
                continue
            share = usd / len(active)
            for lease in active:
                per_job[lease.job_id] += share
                per_variant[lease.variant or NO_VARIANT] += share
    report.per_job, report.per_variant = dict(per_job), dict(per_variant)
    report.per_type, report.per_day = dict(per_type), dict(per_day)
    return report
