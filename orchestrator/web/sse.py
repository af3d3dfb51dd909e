"""One server-sent-events stream that carries several named sources, each sent again only when it changes.

A page opens one ``EventSource`` and listens for the event names it wants (``jobs``, ``nodes``, ...). The
server reads each source at most once per interval however many pages are open (the reads are blocking
ledger reads: they run on a worker thread), and sends a client a source only when its JSON differs from
what that client last got. A comment line every ``keepalive_s`` keeps proxies from closing an idle
stream. Streams end when the client goes, or when the server's ``stop`` event is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

from dlorch.core.errors import one_line

log = logging.getLogger("dlorch.web")

Source = Callable[[], Any]


def event(name: str, data: Any) -> str:
    """One SSE event: its name and its data as one line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


class _Cached:
    """A source's latest JSON, read at most once per interval (a lock keeps concurrent clients to one read)."""

    def __init__(self, fn: Source) -> None:
        self.fn, self.text, self.read_at = fn, None, -1e18
        self.lock = threading.Lock()

    def get(self, max_age_s: float) -> str | None:
        with self.lock:
            if time.monotonic() - self.read_at >= max_age_s:
                self.read_at = time.monotonic()
                self.text = _read(self.fn)
            return self.text


def _read(fn: Source) -> str | None:
    try:
        return json.dumps(fn(), separators=(",", ":"), allow_nan=False, sort_keys=True)
    except Exception as e:  # a source that fails now (the store unreachable) is retried next tick
        log.warning("event source %s failed: %s: %s", getattr(fn, "__name__", fn), type(e).__name__, one_line(e))
        return None


class EventStream:
    """Named sources multiplexed onto server-sent events; ``response()`` serves one client.

    Args:
        sources: event name -> a function returning that event's JSON-able data (shared by every client).
        interval_s: how often sources are read and changes sent.
        keepalive_s: a comment line after this long without an event.
        stop: ends every stream when set (the server is stopping).
        max_clients: streams open at once; one more is answered 503.
    """

    def __init__(self, sources: dict[str, Source], interval_s: float = 1.0, keepalive_s: float = 15.0,
                 stop: threading.Event | None = None, max_clients: int = 32) -> None:
        self.sources = {name: _Cached(fn) for name, fn in sources.items()}
        self.interval_s, self.keepalive_s = interval_s, keepalive_s
        self.stop = stop or threading.Event()
        self.max_clients, self.clients = max_clients, 0
        self._wake: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def poke(self) -> None:
        """Read every source afresh at the next tick and wake the streams (after an action changed something)."""
        for cached in self.sources.values():
            cached.read_at = -1e18
        for loop, wake in list(self._wake):  # poke may be called from any thread
            loop.call_soon_threadsafe(wake.set)

    async def events(self, extra: dict[str, Source] | None = None) -> AsyncIterator[str]:
        """The event text of one client: every source once at the start, then each change.

        ``extra`` are this client's own sources (e.g. the job it looks at), read every tick for it alone.
        """
        sent: dict[str, str] = {}
        wake = asyncio.Event()
        waker = (asyncio.get_running_loop(), wake)
        self._wake.add(waker)
        last_write = time.monotonic()
        try:
            yield f"retry: {int(self.interval_s * 2000)}\n\n"
            while not self.stop.is_set():
                wake.clear()  # before reading: a poke while reading or sending wakes the next wait at once
                texts = await asyncio.to_thread(self._read_all, extra or {})
                for name, text in texts.items():
                    if text is not None and sent.get(name) != text:
                        sent[name] = text
                        last_write = time.monotonic()
                        yield f"event: {name}\ndata: {text}\n\n"
                if time.monotonic() - last_write >= self.keepalive_s:
                    last_write = time.monotonic()
                    yield ": keepalive\n\n"
                try:
                    await asyncio.wait_for(wake.wait(), timeout=self.interval_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._wake.discard(waker)

    def _read_all(self, extra: dict[str, Source]) -> dict[str, str | None]:
        texts = {name: cached.get(self.interval_s * 0.9) for name, cached in self.sources.items()}
        texts.update({name: _read(fn) for name, fn in extra.items()})
        return texts

    def response(self, extra: dict[str, Source] | None = None):
        """A Starlette response streaming ``events()``; 503 once ``max_clients`` streams are open."""
        from fastapi.responses import JSONResponse, StreamingResponse

        if self.clients >= self.max_clients:
            return JSONResponse({"detail": f"{self.max_clients} event streams are open already; close a tab"},
                                status_code=503)
        self.clients += 1

        async def body() -> AsyncIterator[str]:
            try:
                async for text in self.events(extra):
                    yield text
            finally:
                self.clients -= 1

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})
