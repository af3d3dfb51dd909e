"""The bootstrapping wizard's web app: paint, train candidates, compare, pick, correct, retrain, export.

The page (``static/wizard.*``) holds the slice it shows and the label maps of that slice as typed
arrays of class ids; this app serves slices a window at a time from the session's zarr arrays,
writes each stroke's bounding box under a revision it acknowledges, submits and follows the jobs
(``wizardjobs``), and pushes the session's record over one server-sent-events stream.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from dlorch.core.errors import BadInput, DlorchError, one_line
from dlorch.orchestrator.web import wizardjobs
from dlorch.orchestrator.web.security import UploadLimits, read_body, read_upload
from dlorch.orchestrator.web.sse import EventStream
from dlorch.orchestrator.web.wizardstate import Session, StrokeGap

log = logging.getLogger("dlorch.wizard")
STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 1 << 30


class Wizard:
    """A session with its client, and the thread that follows its jobs."""

    def __init__(self, client, session: Session, export_dir: Path, time_budget: float | None = None,
                 epochs: int | None = None, candidates: int = wizardjobs.CANDIDATES, poll_s: float = 1.0) -> None:
        self.client, self.session, self.export_dir = client, session, export_dir
        self.time_budget, self.epochs, self.candidates, self.poll_s = time_budget, epochs, candidates, poll_s
        self.stop = threading.Event()
        # One event stream per page, the session's record its one source: sent whenever it changes.
        self.events = EventStream({"state": self.progress}, interval_s=1.0, stop=self.stop)
        self.thread = threading.Thread(target=self._follow, name="wizard-jobs", daemon=True)
        self.error: str | None = None

    def start(self) -> "Wizard":
        self.thread.start()
        return self

    def changed(self) -> None:
        self.events.poke()

    def _follow(self) -> None:
        warm_imports()
        while not self.stop.wait(self.poll_s):
            self.step()

    def step(self) -> None:
        """Follow the jobs once; an error is shown on the page, and following goes on."""
        try:
            if wizardjobs.advance(self.client, self.session):
                self.changed()
            self.error = None
        except Exception as e:  # the store or queue away for a moment: say so on the page, try again
            if self.error != one_line(e):
                log.warning("following the wizard's jobs: %s", one_line(e))
                self.error = one_line(e)
                self.changed()

    def progress(self) -> dict[str, Any]:
        """The record the page is sent, with the error following jobs met (if any)."""
        with self.session.lock:
            d = self.session.state.public()
            d["layers"] = {"disagreement": self.session.has("disagreement")}
        d["error"] = self.error
        return d


def create_app(wizard: Wizard):
    """The FastAPI app of one wizard session (``server.WebServer`` serves it behind the access checks)."""
    app = FastAPI(title="dlorch wizard", docs_url=None, redoc_url=None, openapi_url=None)
    s = wizard.session

    @app.exception_handler(DlorchError)
    async def _one_line(request: Request, e: DlorchError):
        status = 409 if isinstance(e, StrokeGap) else getattr(e, "status", 400)
        return JSONResponse({"detail": one_line(e), "gap": isinstance(e, StrokeGap)}, status_code=status)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "wizard.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/state")
    def state():
        return wizard.progress()

    @app.get("/api/slice/{layer}")
    def slice_(layer: str, z: int = 0, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None):
        data = s.window(layer, z, y, x, h, w)
        return Response(data.tobytes(), media_type="application/octet-stream",
                        headers={"X-Shape": f"{data.shape[0]},{data.shape[1]}", "Cache-Control": "no-store"})

    # A stroke is written on the event loop itself (about 10 ms of file work): a hop to a worker thread
    # costs more than that on a busy machine, and strokes are what the page waits for.
    @app.post("/api/stroke")
    async def stroke(body: dict[str, Any]):
        z, y, x, h, w, rev = (_int(body, k) for k in ("z", "y", "x", "h", "w", "rev"))
        raw = base64.b64decode(str(body.get("data", "")), validate=True)
        if len(raw) != h * w or h <= 0 or w <= 0:
            raise BadInput(f"a stroke of {h}x{w} pixels carries {len(raw)} bytes")
        ack = s.apply_patch(str(body.get("layer")), rev, z, y, x, np.frombuffer(raw, np.uint8).reshape(h, w))
        wizard.changed()
        return ack

    @app.post("/api/classes")
    def classes(body: dict[str, Any]):
        names = body.get("names")
        if not isinstance(names, list):
            raise BadInput("send the class names as a list")
        s.set_classes(names)
        wizard.changed()
        return wizard.progress()

    @app.post("/api/labels")
    async def labels(request: Request):
        limits = UploadLimits(max_bytes=MAX_UPLOAD_BYTES, max_voxels=max(1, int(np.prod(s.state.shape))), max_dims=3)
        body = await read_body(request.stream(), request.headers.get("content-length"), "labels", limits)
        s.load_labels(read_upload(body, "labels", limits))
        wizard.changed()
        return wizard.progress()

    @app.post("/api/train")
    def train():
        wizardjobs.train_candidates(wizard.client, s, wizard.candidates, wizard.time_budget, wizard.epochs)
        wizard.changed()
        return wizard.progress()

    @app.post("/api/pick")
    def pick(body: dict[str, Any]):
        wizardjobs.pick(s, str(body.get("candidate", "")))
        wizard.changed()
        return wizard.progress()

    @app.post("/api/accept")
    def accept(body: dict[str, Any]):
        _, model = wizardjobs.chosen(s)
        z, y, x, h, w = (_int(body, k) for k in ("z", "y", "x", "h", "w"))
        threshold = float(body.get("threshold") or 0)
        if not 0 <= threshold <= 1:
            raise BadInput("the confidence threshold lies between 0 and 1")
        taken = s.accept_box(model.layer, z, y, x, h, w, model.confidence, threshold)
        wizard.changed()
        return {"accepted": taken, "rev": s.state.revision, "counts": s.state.counts}

    @app.get("/api/suggest")
    def suggest(k: int = 8):
        return {"tiles": wizardjobs.suggestions(s, k)}

    @app.post("/api/retrain")
    def retrain():
        wizardjobs.retrain(wizard.client, s, wizard.time_budget, wizard.epochs)
        wizard.changed()
        return wizard.progress()

    @app.post("/api/export")
    def export():
        wizardjobs.export(wizard.client, s, wizard.export_dir)
        wizard.changed()
        return wizard.progress()

    @app.get("/api/events")
    def events():
        return wizard.events.response()

    return app


def warm_imports() -> None:
    """Import what "Train candidates" and the later steps need (the candidate zoo pulls in torch) while the
    user paints: on the first click it took 20-24 s of a loaded 2-core machine before any job was submitted."""
    import dlorch.core.engine.segment.zoo  # noqa: F401
    import dlorch.core.engine.suggest  # noqa: F401


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"field {key!r} must be a whole number")
    return value
