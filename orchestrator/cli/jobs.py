"""Job commands: ``submit`` a JSON spec, ``jobs``, ``status``, ``logs``, ``cancel``; ``evaluate`` a result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dlorch.orchestrator.cli.common import client, run_job


def submit(
    spec_file: Path = typer.Argument(..., help="a JobSpec as JSON; local image/labels/model paths are uploaded"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to its end"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="with --wait: copy the result here"),
) -> None:
    """Submit a job described by a JSON spec (for scripts); prints the job id."""
    from dlorch.orchestrator.submit import read_spec_file, upload_spec_inputs

    data = read_spec_file(spec_file, out)
    c = client()
    run_job(c, upload_spec_inputs(c, data), detach=not wait, out=out)


def jobs(as_json: bool = typer.Option(False, "--json", help="one JSON document")) -> None:
    """List jobs, oldest first, with their node and epochs (blocks: `dlorch status JOB`)."""
    from dlorch.orchestrator.cli import views

    all_jobs = client().ledger.jobs()
    if as_json:
        typer.echo(json.dumps([j.public() for j in all_jobs], indent=1))
    else:
        views.jobs_table(all_jobs)


def status(job: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """One job in detail: status, attempts, progress, timings, plan."""
    from dlorch.orchestrator.cli import views

    j = client().ledger.get(job)
    if as_json:
        typer.echo(json.dumps(j.public(), indent=1))
    else:
        views.job_detail(j)


def logs(job: str = typer.Argument(...)) -> None:
    """The job's history and each attempt's log."""
    c = client()
    for line in c.logs(c.ledger.get(job)):
        typer.echo(line)


def cancel(job: str = typer.Argument(...)) -> None:
    """Cancel a queued or running job (its node stops at the next heartbeat)."""
    reply = client().call({"type": "cancel", "job": job})
    typer.echo(f"cancelled {reply['job']}")


def evaluate(
    prediction: Path = typer.Argument(..., help="predicted label map"),
    truth: str = typer.Argument(..., help="dense labels (file.npz:NAME picks an array)"),
    slices: Optional[str] = typer.Option(None, "--slices", help="first axis range to score, e.g. 5:30"),
) -> None:
    """Score a label map against dense labels: IoU per class, mean IoU, pixel error."""
    from dlorch.core.metrics import score_files

    for k, v in score_files(prediction, truth, slices).items():
        typer.echo(f"{k:>16}: {v:.4f}")
