"""``dlorch up``: the orchestrator service on this machine, with local agents if asked, until interrupted."""

from __future__ import annotations

import signal
import threading

import typer

from dlorch.core.errors import redact
from dlorch.orchestrator.cli.common import client, log_to_stderr


def up(agents: int = typer.Option(0, "--agents", min=0, help="also start N local node agents")) -> None:
    """Run the orchestrator service (and optionally local agents) until interrupted."""
    from dlorch.orchestrator.client import LocalService

    log_to_stderr()
    c = client()
    svc = LocalService(c, agents=agents)
    stop = threading.Event()
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: stop.set())
    typer.echo(f"orchestrator up: store {redact(c.settings.resolved_store())} queue {redact(c.queue.url)} "
               f"agents {agents}", err=True)
    try:
        svc.serve(stop)
    finally:
        typer.echo("stopping: draining local agents", err=True)
        svc.close()
