"""``dlorch wizard``: the bootstrapping wizard in the browser, on an image (its session resumed if it has one)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import typer

from dlorch.orchestrator.cli.common import EPOCHS, TIME_BUDGET, client


def wizard(
    image: Optional[str] = typer.Argument(None, help="image to label: TIFF, zarr, .npy or .npz (file.npz:NAME)"),
    labels: Optional[str] = typer.Option(None, "--labels", help="labels painted in napari or ilastik (0 = unlabelled)"),
    session: Optional[str] = typer.Option(None, "--session", help="resume this session (its id) instead"),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="port to serve on (0: a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; another than 127.0.0.1 asks for a token"),
    no_browser: bool = typer.Option(False, "--no-browser", help="print the URL only"),
    export_dir: Optional[Path] = typer.Option(None, "--export-dir", help="where Export writes (default: ./wizard-SESSION)"),
    candidates: int = typer.Option(4, "--candidates", min=2, max=5, help="model variants trained side by side"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
) -> None:
    """Paint labels, train candidate models side by side, pick one, correct it, retrain, export."""
    from dlorch.orchestrator.client import local_service
    from dlorch.orchestrator.web.server import WebServer
    from dlorch.orchestrator.web.wizard import Wizard, create_app

    if not image and not session:
        raise typer.BadParameter("give an IMAGE, or --session ID to resume a session")
    c = client()
    s = _open_session(c, image, labels, session)
    out = export_dir or Path(f"wizard-{s.state.session}")
    with local_service(c, agents=candidates) as service:
        w = Wizard(c, s, out.resolve(), time_budget=time_budget, epochs=epochs, candidates=candidates).start()
        server = WebServer(create_app(w), host, port, name="wizard")
        url = server.start()
        typer.echo(f"session {s.state.session}", err=True)
        typer.echo(url)
        if not no_browser and _has_display():
            import webbrowser

            webbrowser.open(url)
        stop = threading.Event()
        try:
            if service is not None:
                service.serve(stop)
            else:
                stop.wait()
        except KeyboardInterrupt:
            typer.echo("wizard stopped; its session is kept: `dlorch wizard --session "
                       f"{s.state.session}` resumes it", err=True)
        finally:
            w.stop.set()
            server.stop()


def _open_session(c, image: str | None, labels: str | None, session: str | None):
    from dlorch.core.imageio import read_image, split_key
    from dlorch.orchestrator.inputs import training_inputs, upload
    from dlorch.orchestrator.web.wizardstate import Session

    if session:
        s = Session.open(c.store, session)
        if labels:
            s.load_labels(read_image(*split_key(labels), role="labels"))
        return s
    arrays = training_inputs({"image": image}, "segmentation")
    data = arrays["image"]
    if data.ndim not in (2, 3):
        from dlorch.core.errors import BadInput

        raise BadInput(f"image {image} has shape {data.shape}; the wizard takes a 2D image or a (Z, Y, X) stack")
    lab = read_image(*split_key(labels), role="labels") if labels else None
    return Session.create(c.store, data, image, upload(c, image, "image", data), lab)


def _has_display() -> bool:
    """Whether a graphical browser can open here (on a server without a display, webbrowser would start a
    text browser in the terminal the URL was printed to)."""
    import os
    import sys

    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
