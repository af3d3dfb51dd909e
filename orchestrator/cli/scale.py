"""``dlorch scale`` (set and show the fleet's scale policy) and ``dlorch cost``; the fleet controller of ``dlorch up``."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Optional

import typer

from dlorch.core.errors import BadInput
from dlorch.orchestrator.cli.common import client

log = logging.getLogger("dlorch.fleet")


def scale(
    min_nodes: Optional[int] = typer.Option(None, "--min", min=0, help="nodes kept running even with no work"),
    max_nodes: Optional[int] = typer.Option(None, "--max", min=0, help="most nodes launched at once (0: none)"),
    cap_usd: Optional[float] = typer.Option(None, "--cap-usd", min=0,
                                            help="hard cap on spend per cap period, US dollars (paid providers)"),
    no_cap: bool = typer.Option(False, "--no-cap", help="remove the cap (free providers only)"),
    cap_period: Optional[str] = typer.Option(None, "--cap-period", help="the cap's period: 1d, 12h, 30m, ..."),
    instance_types: Optional[str] = typer.Option(None, "--instance-types",
                                                 help="types to launch, e.g. g5.xlarge,g4dn.xlarge (default: all "
                                                      "in the price table)"),
    spot: Optional[bool] = typer.Option(None, "--spot/--on-demand", help="spot first (on-demand after failures), "
                                        "or on-demand only"),
    idle_minutes: Optional[float] = typer.Option(None, "--idle-minutes", min=0,
                                                 help="retire a node idle this long (after its billing minimum)"),
    provider: Optional[str] = typer.Option(None, "--provider", help="local, ec2 or slurm"),
    launch_template: Optional[str] = typer.Option(None, "--launch-template", help="ec2: the launch template's name"),
    region: Optional[str] = typer.Option(None, "--region", help="ec2: the region, e.g. us-east-1"),
    subnets: Optional[str] = typer.Option(None, "--subnets", help="ec2: subnets to launch into, comma-separated"),
    slurm_script: Optional[str] = typer.Option(None, "--slurm-script", help="slurm: the agent's batch script"),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: the partition"),
    tick: Optional[str] = typer.Option(None, "--tick", help="how often the controller decides (default 10s)"),
    as_json: bool = typer.Option(False, "--json", help="print the config as JSON"),
) -> None:
    """Set the fleet's scale policy (read by the running orchestrator at its next tick), or show it."""
    from dlorch.orchestrator.fleet import config as fc
    from dlorch.orchestrator.fleet.prices import load_prices

    c = client()
    current = fc.load(c.ledger)
    changes: dict[str, Any] = dict(
        min_nodes=min_nodes, max_nodes=max_nodes, cap_usd=cap_usd, idle_s=None if idle_minutes is None else
        idle_minutes * 60.0, provider=provider, spot=spot, launch_template=launch_template, region=region,
        slurm_script=slurm_script, partition=partition)
    if cap_period is not None:
        changes["cap_period_s"] = fc.parse_duration(cap_period, "--cap-period")
    if tick is not None:
        changes["tick_s"] = fc.parse_duration(tick, "--tick")
    if instance_types is not None:
        changes["instance_types"] = tuple(t.strip() for t in instance_types.split(",") if t.strip())
    if subnets is not None:
        changes["subnets"] = tuple(s.strip() for s in subnets.split(",") if s.strip())
    if no_cap and cap_usd is not None:
        raise BadInput("--cap-usd and --no-cap contradict each other; give one")
    if max_nodes is not None and min_nodes is None and current.scale.min_nodes > max_nodes:
        changes["min_nodes"] = max_nodes  # lowering --max lowers a --min above it
    new = fc.update(current, **changes)
    if no_cap:
        import dataclasses

        new = dataclasses.replace(new, scale=dataclasses.replace(new.scale, cap_usd=None))
    if new != current:
        fc.check(new, known_types=set(load_prices().types))
        fc.save(c.ledger, new)
        if new.scale.provider != current.scale.provider:
            typer.echo(f"provider {new.scale.provider}: a running `dlorch up` changes provider when it restarts",
                       err=True)
    if as_json:
        typer.echo(json.dumps(new.to_json(), indent=1))
    else:
        show_config(new)


def show_config(config) -> None:
    from dlorch.orchestrator.fleet.config import format_duration

    s = config.scale
    cap = "none" if s.cap_usd is None else f"${s.cap_usd:g} per {format_duration(s.cap_period_s)}"
    lines = [("provider", s.provider), ("nodes", f"min {s.min_nodes}, max {s.max_nodes}"), ("cap", cap),
             ("types", ", ".join(s.instance_types) or "all in the price table"),
             ("market", "spot first" if s.spot else "on-demand"), ("idle", format_duration(s.idle_s)),
             ("tick", format_duration(s.tick_s))]
    if s.provider == "ec2":
        lines += [("region", config.region or "-"), ("template", config.launch_template or "-"),
                  ("subnets", ", ".join(config.subnets) or "-")]
    if s.provider == "slurm":
        lines += [("script", config.slurm_script or "-"), ("partition", config.partition or "-")]
    for k, v in lines:
        typer.echo(f"{k:<10} {v}")


def configure_up(c, max_nodes: int | None, provider: str | None):
    """``dlorch up --max-nodes N [--provider P]``: the scale config with those set (local by default)."""
    from dlorch.orchestrator.fleet import config as fc
    from dlorch.orchestrator.fleet.prices import load_prices

    current = fc.load(c.ledger)
    if max_nodes is None and provider is None:
        return current
    changes: dict[str, Any] = {"max_nodes": max_nodes, "provider": provider}
    if max_nodes is not None and current.scale.min_nodes > max_nodes:
        changes["min_nodes"] = max_nodes
    new = fc.update(current, **changes)
    if new != current:
        fc.check(new, known_types=set(load_prices().types))
        fc.save(c.ledger, new)
    return new


class FleetService:
    """The fleet controller of ``dlorch up``, ticking on its own thread; ``close`` stops it (and asks local
    agents it launched to hand their jobs back while the orchestrator still runs)."""

    def __init__(self, c, orch, config) -> None:
        from dlorch.nodeagent.hardware import cpu_count
        from dlorch.orchestrator.fleet.controller import FleetController, make_provider

        self.stop = threading.Event()
        kw: dict[str, Any] = {}
        if config.scale.provider == "local":
            per = max(1, cpu_count() // max(1, config.scale.max_nodes))
            kw["agent_args"] = ["--threads", str(per)]
        self.provider = make_provider(config, c.settings, **kw)
        self.controller = FleetController(orch, self.provider)
        self.thread = self.controller.start(self.stop)

    @classmethod
    def start(cls, c, orch, config) -> "FleetService | None":
        """The service, or None (logged) when the provider cannot be set up and nothing is to be launched."""
        try:
            return cls(c, orch, config)
        except Exception as e:
            if config.active:
                raise
            log.warning("fleet controller not started (%s: %s); `dlorch scale` and a restart start it",
                        type(e).__name__, e)
            return None

    def close(self, timeout: float = 60.0) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        if getattr(self.provider, "name", "") != "local":
            return  # cloud and batch machines outlive the orchestrator: a restart adopts them again
        import time

        try:
            live = self.controller.stop_all("dlorch up stopped")
            deadline = time.monotonic() + timeout
            while live and time.monotonic() < deadline:
                time.sleep(0.5)
                live = self.controller.observe()
        except Exception as e:  # stopping anyway: the agents end with this process (--parent)
            log.warning("stopping local agents: %s", e)


def cost(by: str = typer.Option("job", "--by", help="job, model, type or day"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """What the fleet cost, from the ledger: per job, candidate model, node type or day; idle as its own line."""
    from dlorch.orchestrator.fleet import costview

    if by not in costview.GROUPS:
        raise BadInput(f"--by {by!r}: choose {', '.join(costview.GROUPS)}")
    c = client()
    report = costview.report(c.ledger, by)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        costview.print_report(report)
