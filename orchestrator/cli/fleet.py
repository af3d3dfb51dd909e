"""``dlorch up``: the orchestrator service on this machine, with local agents if asked, until interrupted."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import typer

from dlorch.core.errors import redact
from dlorch.orchestrator.cli.common import client, log_to_stderr


def up(agents: int = typer.Option(0, "--agents", min=0, help="also start N local node agents"),
       port: Optional[int] = typer.Option(None, "--port", min=0, max=65535,
                                          help="dashboard port (default 8470, or a free one if taken; 0: a free one)"),
       host: str = typer.Option("127.0.0.1", "--host", help="dashboard address; any but loopback needs the token "
                                "printed in its URL"),
       dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="serve the dashboard"),
       max_nodes: Optional[int] = typer.Option(None, "--max-nodes", min=0,
                                               help="launch up to N nodes when work waits, retire them when idle "
                                                    "(sets `dlorch scale --max`)"),
       provider: Optional[str] = typer.Option(None, "--provider", help="where nodes are launched: local (default), "
                                              "ec2 or slurm (sets `dlorch scale --provider`)")) -> None:
    """Run the orchestrator service (and optionally local agents) until interrupted; serve the dashboard."""
    from dlorch.orchestrator.client import LocalService

    from dlorch.orchestrator.cli.scale import FleetService, configure_up

    log_to_stderr()
    c = client()
    fleet_config = configure_up(c, max_nodes, provider)
    svc = LocalService(c, agents=agents)
    fleet = FleetService.start(c, svc.orch, fleet_config)
    stop = threading.Event()
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: stop.set())
    typer.echo(f"orchestrator up: store {redact(c.settings.resolved_store())} queue {redact(c.queue.url)} "
               f"agents {agents}" + (f", up to {fleet_config.scale.max_nodes} {fleet_config.scale.provider} nodes on "
                                     "demand" if fleet_config.active else ""), err=True)
    web = None
    try:
        if dashboard:
            from dlorch.orchestrator.web import dashboard as board

            web = board.serve(c, svc.orch, host=host, port=port)
            typer.echo(f"dashboard: {web.login_url}", err=True)
        svc.serve(stop)
    finally:
        if web is not None:
            web.stop()
        typer.echo("stopping: draining local agents", err=True)
        if fleet is not None:
            fleet.close()
        svc.close()
