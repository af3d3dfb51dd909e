"""Node commands: ``dlorch agent`` runs one; ``dlorch nodes`` lists them; ``dlorch nodes drain`` sends one home."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import typer

from dlorch.orchestrator.cli.common import client, log_to_stderr, settings

nodes_app = typer.Typer(help="List node agents, or drain one.")


def agent(
    node_id: Optional[str] = typer.Option(None, "--node-id", help="a stable name for this node"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all)"),
    spot_notices: Optional[str] = typer.Option(
        None, "--spot-notices", envvar="DLORCH_SPOT_NOTICES",
        help="poll EC2 metadata for spot interruption notices: 'ec2' or a metadata base URL"),
    nice: int = typer.Option(0, "--nice", min=0, max=19, envvar="DLORCH_NICE",
                             help="lower this agent's CPU priority (Unix niceness), e.g. on a lab PC someone works at"),
    parent: Optional[int] = typer.Option(None, "--parent", min=1,
                                         help="stop when process PID ends (the commands that start a local agent "
                                              "set it)"),
    handed_back_status: int = typer.Option(
        0, "--handed-back-status", min=0, max=255, envvar="DLORCH_HANDED_BACK_STATUS",
        help="exit with this status when a signal or spot notice stopped the agent while it held work (handed "
             "back to the queue), so that a batch script can requeue itself (infra/slurm uses 75)"),
) -> None:
    """Run a node agent: take jobs from the queue one at a time until drained or signalled."""
    from dlorch.nodeagent.agent import Agent
    from dlorch.nodeagent.interrupts import install_signal_handlers, stop_with_parent

    log_to_stderr()
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    if threads:
        os.environ["DLORCH_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    spot_url = "http://169.254.169.254" if spot_notices == "ec2" else spot_notices
    a = Agent(settings(), node_id=node_id, spot_metadata_url=spot_url)
    install_signal_handlers(a.stop)
    if parent:
        stop_with_parent(a.stop, parent)
    a.run()
    if handed_back_status and a.work_left():
        raise typer.Exit(handed_back_status)


@nodes_app.callback(invoke_without_command=True)
def nodes(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
          all_nodes: bool = typer.Option(False, "--all", help="include nodes that left")) -> None:
    """List node agents with their hardware, job and last heartbeat."""
    if ctx.invoked_subcommand:
        return
    from dlorch.orchestrator.cli import views

    from dlorch.orchestrator.fleet.records import node_fleet_info

    c = client()
    now = time.time()
    found = c.nodes(now, include_left=all_nodes)
    fleet = node_fleet_info(c.ledger, now)
    if as_json:
        typer.echo(json.dumps([{**n.public(now, c.settings.lease_s), "fleet": fleet.get(n.id, {"kind": "static"})}
                               for n in found], indent=1))
    else:
        views.nodes_table(found, now, c.settings.lease_s, fleet)


@nodes_app.command("drain")
def drain(node: str = typer.Argument(..., help="node id (or a unique prefix)")) -> None:
    """Ask a node to finish or checkpoint its job, hand it back, and exit."""
    reply = client().call({"type": "drain", "node": node})
    typer.echo(f"draining {reply['node']}")
