"""What every command shares: settings and the client from the global options, shared options, following a job."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from dlorch.core.errors import BadInput, RedactSecrets
from dlorch.core.settings import Settings
from dlorch.core.spec import MAX_EPOCHS, MAX_PRIORITY, MIN_PRIORITY, parse_spec

# --store and --queue as the global callback received them; unset ones fall back to DLORCH_* variables.
global_options: dict[str, Any] = {}

TTA_HELP = ("segmentation: average 8 flips/rotations at prediction (8x its time). By default the model's plan decides:"
            " on where that costs at most half the training time (a 2D stack: +0.02-0.04 mean IoU on ISBI), off"
            " for a large 3D volume on a CPU")
# Shared by every command that submits work; the limits are the job spec's own.
EPOCHS = typer.Option(None, "--epochs", min=1, max=MAX_EPOCHS, help="override the automatic epoch count")
TIME_BUDGET = typer.Option(None, "--time-budget", min=1, help="cap on training seconds (over resumes)")
PRIORITY = typer.Option(0, "--priority", min=MIN_PRIORITY, max=MAX_PRIORITY,
                        help="higher runs first; FIFO within a priority")
DETACH = typer.Option(False, "--detach", help="print only the job id and return")
INTERRUPTED = "interrupted: the job stays in the queue; `dlorch up` continues it"


def settings() -> Settings:
    """Settings from options, then ``DLORCH_*`` variables."""
    try:
        return Settings(**{k: v for k, v in global_options.items() if v})
    except Exception as e:
        raise BadInput(f"bad setting: {e}".splitlines()[0]) from None


def client():
    """A client of the deployment the options name, its store and queue opened, or one line saying why not."""
    import sqlite3

    from dlorch.orchestrator.client import Client

    s = settings()
    try:
        c = Client(s)
        c.check_queue()
    except (OSError, sqlite3.Error) as e:  # a store path that is a file, an unwritable home, a damaged queue.db
        what = getattr(e, "strerror", None) or str(e)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise BadInput(f"cannot open dlorch's store or queue: {what}{where}; point --store (DLORCH_HOME) at a "
                       "writable directory and --queue at a writable sqlite:/// file or a redis:// URL") from None
    return c


def run_job(c, spec: dict[str, Any], detach: bool, out: Path | None) -> None:
    """Submit a job; unless detached, follow it with a progress bar to its end and copy its result to ``out``.

    Prints the job id last on stdout; the rest goes to stderr.
    """
    from dlorch.orchestrator.cli import views
    from dlorch.orchestrator.client import local_service
    from dlorch.orchestrator.submit import take_result

    if detach:
        typer.echo(c.submit(spec))
        return
    parse_spec(spec)  # a bad spec fails before a local orchestrator and agent are started for it
    with local_service(c) as service:
        try:
            job_id = c.submit(spec)
            typer.echo(f"job {job_id}", err=True)
            job = views.follow(c, job_id, service)
        except KeyboardInterrupt:
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None
    where = take_result(c, job, out)
    if where is not None:
        typer.echo(f"wrote {where}", err=True)
    if job.model:
        typer.echo(f"model {job.model}", err=True)
    typer.echo(job.id)


def log_to_stderr() -> None:
    """Log lines on stderr for the long-running commands (``up``, ``agent``), without the libraries' chatter."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())  # a Redis password in a URL never reaches a log line
    for noisy in ("lightning", "pytorch_lightning", "lightning.pytorch", "huey", "lightning.fabric",
                  "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                  "pytorch_lightning.trainer.connectors.checkpoint_connector", "botocore", "aiobotocore", "s3fs",
                  "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
