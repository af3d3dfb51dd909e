"""How the CLI shows jobs and nodes: rich tables and a progress bar that follows a job."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dlorch.core.spec import Job, JobStatus, NodeInfo

import sys

# Piped output (scripts, grep) gets whole lines, not columns folded to a guessed 80-character terminal.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True)


def _ago(t: float | None, now: float) -> str:
    return "-" if not t else f"{now - t:.0f}s ago"


def jobs_table(jobs: list[Job]) -> None:
    """``dlorch jobs``."""
    now = time.time()
    t = Table(box=None)
    for col in ("id", "kind", "status", "prio", "epochs", "attempts", "node", "updated", "error"):
        t.add_column(col)
    for j in jobs:
        epochs = f"{j.epochs_done}/{j.epochs_total or '?'}" if j.spec.trains else "-"
        t.add_row(j.id, j.spec.kind, j.status.value, str(j.spec.priority), epochs, str(len(j.attempts)),
                  j.node or "-", _ago(j.updated_at, now), (j.error or "")[:60])
    console.print(t)


def job_detail(j: Job) -> None:
    """``dlorch status JOB``."""
    now = time.time()
    console.print(f"[bold]{j.id}[/] {j.spec.kind} [bold]{j.status.value}[/]"
                  + (f" epoch {j.epochs_done}/{j.epochs_total or '?'}" if j.spec.trains else ""))
    for label, value in (("image", j.spec.image), ("labels", j.spec.labels), ("model", j.model or j.spec.model),
                         ("output", j.output), ("checkpoint", j.checkpoint), ("error", j.error)):
        if value:
            console.print(f"  {label:<10} {value}")
    if j.blocks:
        console.print(f"  blocks     {blocks_summary(j, now)}")
        tm = j.blocks.get("timings", {})
        if tm:
            console.print("  per block  " + "  ".join(f"{k.removesuffix('_s')}={v / max(1, j.blocks['done']):.4f}s"
                                                  for k, v in sorted(tm.items()) if k != "downloads")
                          + f"  (model downloads: {int(tm.get('downloads', 0))})")
    if j.metrics:
        console.print("  metrics    " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(j.metrics.items())))
    console.print("  attempts:")
    t = Table(box=None)
    for col in ("token", "node", "outcome", "epochs", "started", "took", "timings"):
        t.add_column(col)
    for a in j.attempts:
        took = f"{(a.ended_at or now) - a.started_at:.1f}s" if a.started_at else "-"
        timings = " ".join(f"{k.removesuffix('_s')}={v:.1f}" for k, v in a.timings.items())
        t.add_row(str(a.token), a.node or "-", a.outcome.value, f"{a.epochs_start}->{a.epochs_done}",
                  _ago(a.started_at, now), took, timings)
    console.print(t)
    if j.plan and j.plan.get("reasons"):
        console.print("  plan:")
        for r in j.plan["reasons"]:
            console.print(f"    - {r}")


_PRECISION = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


def nodes_table(nodes: list[NodeInfo], now: float, lease_s: float, fleet: dict[str, dict] | None = None) -> None:
    """``dlorch nodes``: static, local, Slurm and EC2 nodes side by side (``fleet``: per node id, what the
    fleet recorded of its machine: kind, type, market, price, idle seconds)."""
    fleet = fleet or {}
    t = Table(box=None)
    for col in ("id", "kind", "type", "market", "$/h", "host", "state", "job", "idle", "gpus", "precision",
                "heartbeat"):
        t.add_column(col)
    for n in nodes:
        f = fleet.get(n.id, {})
        gpus = ", ".join(f"{g['name']} {g['memory_bytes'] / 2**30:.0f}G" for g in n.gpus) or "-"
        state = n.state if n.alive(now, lease_s) else "lost"
        idle = f.get("idle_s")
        price = f.get("price_usd_h")
        t.add_row(n.id, f.get("kind", "static"), f.get("type", "-"), f.get("market", "-"),
                  "-" if price is None else f"{price:.4g}", n.hostname, state, n.job or "-",
                  "-" if idle is None or n.job else f"{idle:.0f}s", gpus,
                  _PRECISION.get(n.precision, n.precision or "-"), _ago(n.heartbeat_at, now))
    console.print(t)


def follow(client, job_id: str, service=None) -> Job:
    """Show a progress bar until the job ends; returns its final record."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                  TimeElapsedColumn(), console=err_console, transient=False,
                  refresh_per_second=2) as bar:  # redrawn twice a second: a training job beside it wants the cores
        task = bar.add_task(job_id, total=None, state="queued")

        def update(job: Job) -> None:
            if service is not None and service.error is not None:
                raise service.error
            if job.blocks:
                total, done = job.blocks["total"], job.blocks["done"]
            elif job.spec.trains:
                total, done = job.epochs_total, job.epochs_done
            else:
                total, done = 1, int(job.status is JobStatus.SUCCEEDED)
            bar.update(task, total=total, completed=done, state=_state(job))

        return client.wait(job_id, update)


def blocks_summary(job: Job, now: float) -> str:
    """Blocks done/total, throughput and each node's share, for a blockwise job."""
    b = job.blocks or {}
    took = (b.get("finished_at") or now) - b.get("started_at", now)
    mvox = b.get("voxels_done", 0) / 1e6
    share = ", ".join(f"{n} {k}" for n, k in sorted(b.get("by_node", {}).items()))
    rate = f" {mvox / took:.2f} Mvox/s" if took > 0 else ""
    return f"{b.get('done', 0)}/{b.get('total', 0)} blocks{rate}" + (f" ({share})" if share else "")


def _state(job: Job) -> str:
    if job.blocks:
        return f"{job.status.value} " + blocks_summary(job, time.time())
    if job.spec.trains:
        s = f"{job.status.value} epoch {job.epochs_done}/{job.epochs_total or '?'}"
    else:
        s = job.status.value
    if job.status is JobStatus.RUNNING and job.node:
        s += f" on {job.node}"
    if "val_iou" in job.metrics:
        s += f" val IoU {job.metrics['val_iou']:.3f}"
    return s


def follow_many(client, job_ids: list[str], service=None, poll_s: float = 1.0) -> list[Job]:
    """One progress bar per job until all end; returns their final records."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                  TimeElapsedColumn(), console=err_console) as bar:
        tasks = {jid: bar.add_task(jid, total=None, state="queued") for jid in job_ids}
        while True:
            if service is not None and service.error is not None:
                raise service.error
            jobs = [client.ledger.get(jid) for jid in job_ids]
            for j in jobs:
                bar.update(tasks[j.id], total=j.epochs_total, completed=j.epochs_done, state=_state(j))
            if all(j.status.is_terminal() for j in jobs):
                return jobs
            time.sleep(poll_s)


def candidates_table(jobs: list[Job], names: dict[str, str]) -> None:
    """The candidates side by side, best held-out score first."""
    t = Table(box=None, title="candidates: validation on held-back painted strokes")
    for col in ("variant", "job", "status", "node", "epochs", "val IoU", "val loss", "train s"):
        t.add_column(col)
    for j in sorted(jobs, key=lambda j: -j.metrics.get("best_val_iou", -1)):
        m = j.metrics
        t.add_row(names[j.id], j.id, j.status.value, j.node or "-", f"{j.epochs_done}/{j.epochs_total or '?'}",
                  f"{m['best_val_iou']:.4f}" if "best_val_iou" in m else "-",
                  f"{m['val_loss']:.4f}" if "val_loss" in m else "-",
                  f"{m['train_seconds']:.0f}" if "train_seconds" in m else "-")
    console.print(t)
