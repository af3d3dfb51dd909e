"""A web app served by uvicorn on a thread of this process, behind ``security.Guard``, until stopped.

``WebServer(app, host, port).start()`` binds the socket itself (port 0: a free one, so the URL is known
before any request), starts uvicorn on a daemon thread and returns the URL to print; a port in use or an
address this machine does not have is one line. ``stop()`` ends the event streams and the server.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import Any

from dlorch.core.errors import BadInput
from dlorch.orchestrator.web.security import Access, Guard, WILDCARDS

log = logging.getLogger("dlorch.web")


class WebServer:
    """One app on one address, in a thread.

    Args:
        app: an ASGI app (FastAPI).
        host: the address to bind; loopback (the default) needs no token, any other gets one.
        port: 0 for a free port.
        extra_hosts: further names the server answers to in ``Host`` (e.g. a DNS name pointing here).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, extra_hosts: tuple[str, ...] = (),
                 name: str = "web") -> None:
        self.host, self.port, self.name = host, port, name
        self.access = Access.for_bind(host, extra_hosts=extra_hosts)
        self.app = app
        self.stopping = threading.Event()  # set first on stop: event streams end with it
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The server's address, without the token."""
        host = socket.gethostname() if self.host in WILDCARDS else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The URL to print once: with ``?token=`` when the server needs one."""
        return f"{self.url}?token={self.access.token}" if self.access.token else self.url

    def start(self, timeout: float = 15.0) -> str:
        """Bind, serve on a thread, and return ``login_url`` once the server accepts connections."""
        import uvicorn

        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(Guard(self.app, self.access), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                                timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"{self.name}-server", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise BadInput(f"the {self.name} server did not start: {self._error or 'it ended'}")
            if waited >= timeout:
                raise BadInput(f"the {self.name} server did not start within {timeout:.0f}s")
            self._thread.join(0.02)
            waited += 0.02
        log.info("%s server on %s", self.name, self.url)
        return self.login_url

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as e:  # shown by start(), or logged if it comes later
            self._error = e
            log.error("%s server stopped: %s: %s", self.name, type(e).__name__, e)
        finally:
            sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        """End the event streams, then the server; wait up to ``timeout`` for its thread."""
        self.stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "WebServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or one line saying why not and what to do."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BadInput(f"cannot serve on host {host!r}: {e.strerror}; give an address of this machine, "
                       "e.g. --host 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR lets another process take a port in use
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise BadInput(f"port {port} on {host} is in use (another `dlorch up`?); choose another --port, "
                           "or --port 0 for a free one") from None
        raise BadInput(f"cannot serve on {host}:{port}: {e.strerror or e}; give an address of this machine "
                       "(--host) and a free --port") from None
    sock.setblocking(False)
    return sock
