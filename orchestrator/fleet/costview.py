"""``dlorch cost``: what the fleet cost, read from the ledger and split over jobs, models, node types or days.

The ledger holds both halves: each launched machine's billing (``fleet/instances``, records.py) and each
job attempt's lease interval (the job records' attempts: node, started_at, ended_at). ``cost.attribute``
splits a machine's billed seconds among the attempts that held it; billed seconds no attempt held are
``idle``, their own line, so the lines sum to the fleet's total. A blockwise job holds each node that ran
some of its blocks from its split to its end (shared evenly with whatever else the node held meanwhile).
Node-hours are the attempts' lease time, on any node (static agents included, which cost nothing).
"""

from __future__ import annotations

import time
from collections import defaultdict

from dlorch.orchestrator.fleet import cost
from dlorch.orchestrator.fleet import records as rec
from dlorch.orchestrator.fleet.records import InstanceRecord

GROUPS = ("job", "model", "type", "day")
IDLE = "idle"


def collect(ledger, now: float, billing_min_s: float, granularity_s: float):
    """The billing records of every launched machine, the lease intervals of every attempt, node types."""
    billing, types = [], {}
    for d in ledger.records(rec.INSTANCES):
        try:
            r = InstanceRecord.from_json(d)
        except (TypeError, ValueError):
            continue
        types[r.node_id] = r.type
        billing += r.billings(billing_min_s if r.ceiling_usd_h > 0 else 0.0, granularity_s)
    leases = []
    for job in ledger.jobs():
        variant = job.spec.options.get("variant")
        for att in job.attempts:
            if att.node is None or att.started_at is None:
                continue
            end = att.ended_at
            if end is None and job.status.is_terminal():
                end = job.updated_at  # cancelled while it ran: its lease ended with the job
            leases.append(cost.LeaseInterval(job_id=job.id, attempt=str(att.token), node_id=att.node,
                                             start=att.started_at, end=end,
                                             variant=str(variant) if variant else None))
        blocks = job.blocks or {}
        if isinstance(blocks.get("started_at"), (int, float)):  # a blockwise job: nodes pulled its blocks
            end = blocks.get("finished_at") or (job.updated_at if job.status.is_terminal() else None)
            for node in blocks.get("by_node") or {}:
                leases.append(cost.LeaseInterval(job_id=job.id, attempt="blocks", node_id=node,
                                                 start=float(blocks["started_at"]), end=end,
                                                 variant=str(variant) if variant else None))
    return billing, leases, types


def report(ledger, by: str, now: float | None = None) -> dict:
    """``dlorch cost --json``: the lines for ``by`` (USD and node-hours), the total, idle, and when it was read."""
    from dlorch.orchestrator.fleet.config import load

    now = time.time() if now is None else now
    cfg = load(ledger).scale
    billing, leases, types = collect(ledger, now, cfg.billing_min_s, cfg.billing_granularity_s)
    r = cost.attribute(billing, leases, now)
    usd = {"job": r.per_job, "model": r.per_variant, "type": r.per_type, "day": r.per_day}[by]
    hours: dict[str, float] = defaultdict(float)
    for lease in leases:
        end = now if lease.end is None else lease.end
        key = {"job": lease.job_id, "model": lease.variant or cost.NO_VARIANT,
               "type": types.get(lease.node_id, "static"), "day": cost.day_of(lease.start)}[by]
        hours[key] += max(0.0, end - lease.start) / 3600.0
    keys = sorted(set(usd) | set(hours), key=lambda k: (-usd.get(k, 0.0), k))
    rows = [{"key": k, "usd": usd.get(k, 0.0), "node_hours": hours.get(k, 0.0)} for k in keys]
    if by in ("job", "model"):
        rows.append({"key": IDLE, "usd": r.idle_usd, "node_hours": r.idle_node_s / 3600.0})
    return {"by": by, "as_of": now, "rows": rows, "total_usd": r.total_usd, "idle_usd": r.idle_usd,
            "idle_share": r.idle_share, "reconciles": r.reconciles()}


def print_report(report: dict) -> None:
    from rich.table import Table

    from dlorch.orchestrator.cli.views import console

    t = Table(box=None)
    for col in (report["by"], "USD", "node-hours"):
        t.add_column(col)
    for row in report["rows"]:
        t.add_row(row["key"], f"{row['usd']:.4f}", f"{row['node_hours']:.3f}")
    t.add_row("total", f"{report['total_usd']:.4f}", "")
    console.print(t)
    if report["by"] in ("type", "day"):
        console.print(f"of which idle: {report['idle_usd']:.4f} USD ({report['idle_share']:.0%} of paid node time)")
