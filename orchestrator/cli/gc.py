"""``dlorch gc``: delete stored artifacts that no resume or prediction needs."""

from __future__ import annotations

import time

import typer

from dlorch.orchestrator.cli.common import client


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be deleted, and delete nothing"),
    older_than: float = typer.Option(0.0, "--older-than", min=0, metavar="DAYS",
                                     help="spare jobs that ended less than DAYS ago"),
) -> None:
    """Delete superseded checkpoints, the checkpoints of ended jobs and results never taken; models and outputs stay."""
    from dlorch.orchestrator.collector import collect

    done = collect(client(), time.time(), older_than * 86400.0, dry_run)
    if dry_run:
        for d in done.deleted:
            typer.echo(f"{d.key}\t{d.why}")
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(done.deleted)} artifacts ({done.bytes / 1e6:.1f} MB)", err=True)
