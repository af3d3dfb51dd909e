"""The dashboard of ``dlorch up``: the page, its JSON API (OpenAPI at ``/openapi.json``) and one event stream.

It runs in the orchestrator's process, on the web server's thread, and only reads (``overview.py``):
the ledger, the queue, the store under ``jobs/``, and the orchestrator's in-memory heartbeats. Its two
actions, cancel a job and drain a node, are the requests ``dlorch cancel`` and ``dlorch nodes drain``
send, answered by the orchestrator like any client's: the web server never writes the ledger.

Routes: ``GET /`` the page; ``GET /api/summary``, ``/api/jobs``, ``/api/jobs/{id}``, ``/api/jobs/{id}/logs``,
``/api/queue``, ``/api/nodes``, ``/api/spend``; ``POST /api/jobs/{id}/cancel``, ``/api/nodes/{id}/drain``;
``GET /api/events?job=ID`` server-sent events ``summary``, ``jobs``, ``queue``, ``nodes``, ``spend`` and,
with ``job``, that job's ``job`` detail.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from dlorch.core.errors import BadInput
from dlorch.core.spec import check_id
from dlorch.orchestrator.web.overview import (JobDetail, JobRow, Logs, NodeRow, Overview, QueueEntry, Spend,
                                              Summary)
from dlorch.orchestrator.web.security import install_error_handlers
from dlorch.orchestrator.web.server import WebServer
from dlorch.orchestrator.web.sse import EventStream

log = logging.getLogger("dlorch.web")

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_PORT = 8470


class ActionReply(BaseModel):
    ok: bool
    message: str


def create_app(overview: Overview, call: Callable[[dict[str, Any]], dict[str, Any]],
               stop: threading.Event | None = None, interval_s: float = 1.0):
    """The dashboard's FastAPI app.

    Args:
        overview: the read-only view of the deployment.
        call: sends a request to the orchestrator and returns its reply (``Client.call``); raises a
            ``DlorchError`` with the orchestrator's reason when refused.
        stop: ends the event streams when set.
    """
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="dlorch dashboard", version="1", docs_url=None, redoc_url=None,
                  description="Jobs, queue, nodes and spend of one dlorch deployment; cancel and drain.")
    install_error_handlers(app)
    acting = threading.Lock()  # one request to the orchestrator at a time from the page

    def found(value: Any, what: str, ident: str) -> Any:
        if value is None:
            raise HTTPException(404, f"no {what} {ident!r}")
        return value

    def rows() -> list[dict[str, Any]]:
        return overview.jobs()

    stream = EventStream({  # jobs first: the others reuse the rows it read
        "jobs": lambda: rows(),
        "summary": lambda: overview.summary(overview.last_rows).model_dump(mode="json"),
        "queue": lambda: [e.model_dump(mode="json") for e in overview.queue_entries(overview.last_rows)],
        "nodes": lambda: [n.model_dump(mode="json") for n in overview.nodes()],
        "spend": lambda: overview.spend().model_dump(mode="json"),
    }, interval_s=interval_s, stop=stop)
    app.state.stream = stream

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "dashboard.html", headers={"cache-control": "no-store"})

    @app.get("/api/summary", response_model=Summary)
    def summary():
        return overview.summary()

    @app.get("/api/jobs", response_model=list[JobRow])
    def jobs():
        return rows()

    @app.get("/api/jobs/{job_id}", response_model=JobDetail)
    def job(job_id: str):
        return found(overview.job(job_id), "job", job_id)

    @app.get("/api/jobs/{job_id}/logs", response_model=Logs)
    def logs(job_id: str):
        return found(overview.logs(job_id), "job", job_id)

    @app.get("/api/queue", response_model=list[QueueEntry])
    def queue():
        return overview.queue_entries()

    @app.get("/api/nodes", response_model=list[NodeRow])
    def nodes(all: bool = Query(False, description="include nodes that left")):
        return overview.nodes(include_left=all)

    @app.get("/api/spend", response_model=Spend)
    def spend():
        return overview.spend()

    @app.post("/api/jobs/{job_id}/cancel", response_model=ActionReply)
    def cancel(job_id: str):
        with acting:
            reply = call({"type": "cancel", "job": check_id("job", job_id)})
        stream.poke()
        return ActionReply(ok=True, message=f"cancelled {reply.get('job', job_id)}")

    @app.post("/api/nodes/{node_id}/drain", response_model=ActionReply)
    def drain(node_id: str):
        with acting:
            reply = call({"type": "drain", "node": check_id("node", node_id)})
        stream.poke()
        return ActionReply(ok=True, message=f"draining {reply.get('node', node_id)}")

    @app.get("/api/events", include_in_schema=False)
    def events(job: str | None = Query(None, description="also stream this job's detail")):
        extra = None
        if job:
            job_id = check_id("job", job)
            extra = {"job": lambda: _dump(overview.job(job_id))}  # null: no such job
        return stream.response(extra)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return model.model_dump(mode="json") if model is not None else None


def serve(client: Any, orchestrator: Any = None, host: str = "127.0.0.1", port: int | None = None,
          extra_hosts: tuple[str, ...] = ()) -> WebServer:
    """Start the dashboard of ``client``'s deployment on a thread; returns the running server.

    ``port`` None is ``DEFAULT_PORT``, or a free port if that one is taken; a port given and taken is
    an error (one line). The orchestrator, if it runs in this process, lends its newest heartbeats.
    """
    node_infos = (lambda: orchestrator.node_infos) if orchestrator is not None else None
    overview = Overview(client, node_infos=node_infos)
    for attempt in ([DEFAULT_PORT, 0] if port is None else [port]):
        server = WebServer(None, host=host, port=attempt, extra_hosts=extra_hosts, name="dashboard")
        server.app = create_app(overview, client.call, stop=server.stopping)
        try:
            server.start()
            return server
        except BadInput as e:
            if port is not None or "in use" not in str(e):
                raise
            log.info("port %d is taken; the dashboard takes a free one", DEFAULT_PORT)
    raise AssertionError("unreachable")
