"""The ``dlorch`` command line: the typer app, its global options, and ``main`` (one line per user error).

Each area's commands live in their own module and only parse, call the library, and print:
``fleet`` (up), ``nodes`` (agent, nodes, drain), ``training`` (segment, denoise, train, predict) and
``jobs`` (submit, jobs, status, logs, cancel, evaluate), ``gc``; ``common`` holds what they share.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Optional

import typer

from dlorch.core.errors import DlorchError, redact
from dlorch.core.malloc import one_arena
from dlorch.core.settings import requested_precision
from dlorch.orchestrator.cli import export, fleet, gc, jobs, nodes, scale, training, wizard
from dlorch.orchestrator.cli.common import global_options

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-configuring deep-learning segmentation on a queue of idle GPUs.")

# The command table, in the order `dlorch --help` lists it.
for command in (fleet.up, nodes.agent, training.segment, training.denoise, training.predict, jobs.submit,
                jobs.jobs, jobs.status, jobs.logs, jobs.cancel, jobs.evaluate, gc.gc, wizard.wizard, scale.scale,
                scale.cost, export.export):
    app.command()(command)
app.add_typer(training.train_app, name="train")
app.add_typer(nodes.nodes_app, name="nodes")


@app.callback()
def _global(
    store: Optional[str] = typer.Option(None, "--store", help="state/data store: directory or s3:// URL [DLORCH_STORE]"),
    queue: Optional[str] = typer.Option(None, "--queue", help="queue: sqlite:///file.db or redis://host:port/db [DLORCH_QUEUE]"),
) -> None:
    global_options.update(store=store, queue=queue)


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Accept ``--store``/``--queue`` anywhere on the line, not only before the command."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--store", "--queue") and i + 1 < len(argv):
            front += [a, argv[i + 1]]
            i += 2
            continue
        if a.startswith(("--store=", "--queue=")):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main() -> None:
    """Entry point: one line on stderr and a non-zero exit for every error a user can cause."""
    one_arena()  # before any thread starts: the agent trains on a worker thread (core/malloc.py)
    argv = _hoist_global_options(sys.argv[1:])
    if not os.environ.get("DLORCH_DEBUG"):
        sys.unraisablehook = _log_unraisable
    # SIGTERM (a `timeout`, a closed terminal's kill) ends a command as Ctrl-C does, so the local
    # orchestrator and agent a command started are stopped, not orphaned. `up` and `agent` install
    # their own handlers.
    signal.signal(signal.SIGTERM, _interrupt)
    from typer._click import exceptions as click  # typer carries its own click; its exceptions are these

    try:
        requested_precision()  # a bad DLORCH_PRECISION: one line now, not a failed job later
        code = app(args=argv, prog_name="dlorch", standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        text = e.ctx.get_help() if e.ctx else ""  # typer's rich help prints itself and returns ""
        if text.strip():
            typer.echo(text)
        sys.exit(2)
    except click.UsageError as e:  # a bad option or argument: one line, and where the help is
        command = e.ctx.command_path if e.ctx else "dlorch"
        typer.echo(f"error: {e.format_message().rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C outside a job (inside one, the job's own message came first)
        sys.exit(130)
    except DlorchError as e:
        typer.echo(f"error: {redact(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for the user; DLORCH_DEBUG=1 shows it
        if os.environ.get("DLORCH_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {redact(str(e))} (DLORCH_DEBUG=1 shows where)", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(code) inside a command
        sys.exit(code)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _log_unraisable(unraisable: Any) -> None:
    """Send "Exception ignored in ..." reports to the debug log instead of stderr.

    After a failed S3 read, zarr leaves the reads it ran beside it unfinished; when they are
    collected, aiobotocore's context reset raises in them, and Python prints each traceback to
    stderr although the error was already handled and reported on one line. DLORCH_DEBUG=1 keeps
    Python's default.
    """
    logging.getLogger("dlorch").debug("ignored in %r: %s: %s", unraisable.object,
                                      getattr(unraisable.exc_type, "__name__", unraisable.exc_type),
                                      unraisable.exc_value)
