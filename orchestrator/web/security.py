"""Who may talk to dlorch's web pages: the bind address, the token, Host and Origin checks, upload checks.

Every page (the dashboard of ``dlorch up``, the wizard) is served through ``Guard``, an ASGI wrapper that
``server.WebServer`` puts around the app, so no page can forget it:

- Bound to a loopback address (the default), only this machine reaches the page; no token is needed.
- Bound to any other address, a random token is made and printed once, in the URL ``/?token=...``. That
  URL exchanges it for an HttpOnly, SameSite=Strict cookie (and redirects to the same page without the
  token); scripts may send ``Authorization: Bearer TOKEN`` instead. Anything else gets 401.
- ``Host`` is checked on every request (DNS rebinding: a page of another site whose name was pointed at
  this address names that site in ``Host``), ``Origin`` on every request that changes something (a form
  or script of another site posting here).
- Uploads are checked before they are read: size (``Content-Length`` and the bytes that actually come),
  type by magic bytes (TIFF, ``.npy``, ``.npz``; never a pickle), and shape from the file's header
  before any pixel is decoded, each refusal one line naming the problem and the fix.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np

from dlorch.core.errors import BadInput, one_line

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
COOKIE = "dlorch_session"  # suffixed with the port: cookies are per host, not per port

# Served with every response: no framing by other sites, no sniffing, scripts and styles from here only.
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) can only be reached from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a ``Host`` or ``Origin`` authority, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Access:
    """The rules of one web server: which ``Host`` names it answers to, and its token (None on loopback)."""

    bind: str
    token: str | None
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_bind(cls, bind: str, token: str | None = None, extra_hosts: tuple[str, ...] = ()) -> "Access":
        """The rules for a server bound to ``bind``: a fresh token unless it is loopback.

        It answers to the loopback names, the bound address, this machine's host names and
        ``extra_hosts`` (e.g. the DNS name of a load balancer); bound to every address (``0.0.0.0``),
        also to any IP address, which no rebinding attack can put in ``Host``.
        """
        hosts = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in extra_hosts}
        if bind not in WILDCARDS:
            hosts.add(bind.lower().strip("[]"))
        if not is_loopback(bind):
            hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
            token = token or secrets.token_urlsafe(24)
        return cls(bind=bind, token=token, hosts=frozenset(hosts))

    @property
    def any_ip(self) -> bool:
        return self.bind in WILDCARDS

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` names this server (not a name someone pointed at its address)."""
        if not host_header:
            return False
        name = host_name(host_header)
        return name in self.hosts or (self.any_ip and _is_ip(name))

    def origin_allowed(self, origin: str | None, host_header: str | None, fetch_site: str | None) -> bool:
        """Whether a mutating request comes from this server's own pages.

        A browser names the page's origin on every POST; it must be this very host. A request with
        neither ``Origin`` nor ``Sec-Fetch-Site`` comes from a script or ``curl``, not from a page.
        """
        if origin is None:
            return fetch_site is None or fetch_site in ("same-origin", "none")
        if origin == "null" or not host_header:
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()

    def session_value(self) -> str:
        """The cookie's value: derived from the token, so the cookie does not carry the token itself."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"dlorch web session", "sha256").hexdigest()

    def token_ok(self, offered: str | None) -> bool:
        return bool(self.token and offered) and hmac.compare_digest(offered.encode(), self.token.encode())

    def session_ok(self, cookie: str | None) -> bool:
        return bool(self.token and cookie) and hmac.compare_digest(cookie.encode(), self.session_value().encode())


def cookie_name(port: int | None) -> str:
    return f"{COOKIE}_{port}" if port else COOKIE


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Guard:
    """ASGI wrapper applying an ``Access``: Host, Origin, token and cookie, and the security headers."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] == "websocket":  # no page uses one: none is accepted, so none skips the checks
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        method = scope.get("method", "GET")
        if not self.access.host_allowed(host):
            await _refuse(send, 421, f"this server does not answer to Host {host!r}; open it by the address "
                                     "`dlorch` printed")
            return
        if method in MUTATING:
            if not self.access.origin_allowed(headers.get("origin"), host, headers.get("sec-fetch-site")):
                await _refuse(send, 403, "a request from another site's page is refused; use this server's own "
                                         "page or a script without an Origin header")
                return
        port = (scope.get("server") or (None, None))[1]
        if self.access.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if "token" in query:
                if not self.access.token_ok(query["token"]):
                    await _refuse(send, 403, "wrong token; open the URL with ?token= that `dlorch` printed")
                    return
                rest = urlencode([(k, v) for k, v in query.items() if k != "token"])
                location = scope.get("path", "/") + (f"?{rest}" if rest else "")
                cookie = (f"{cookie_name(port)}={self.access.session_value()}; HttpOnly; SameSite=Strict; Path=/")
                await _respond(send, 303, b"", [(b"location", location.encode()), (b"set-cookie", cookie.encode()),
                                                (b"cache-control", b"no-store")])
                return
            bearer = headers.get("authorization", "")
            bearer = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
            if not (self.access.token_ok(bearer)
                    or self.access.session_ok(_cookies(headers.get("cookie", "")).get(cookie_name(port)))):
                await _refuse(send, 401, "this server needs its token: open the URL with ?token= that `dlorch` "
                                         "printed, or send Authorization: Bearer TOKEN")
                return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers, *HEADERS]})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json")])


# -- uploads --------------------------------------------------------------------------------------------

class UploadRefused(BadInput):
    """An upload that is too large, of the wrong type or shape; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one upload: bytes on the wire, dimensions, and voxels (decoded size, checked from the header)."""

    max_bytes: int = 1 << 30
    max_voxels: int = 1 << 30
    min_dims: int = 2
    max_dims: int = 4


KINDS = {"tiff": ".tif", "npy": ".npy", "npz": ".npz"}


def sniff(head: bytes) -> str | None:
    """The file type of an upload from its first bytes: ``tiff``, ``npy``, ``npz``, or None."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "npz"
    return None


def check_type(data: bytes, what: str = "image") -> str:
    """The upload's kind by its magic bytes (the name and the Content-Type a client sent are not trusted)."""
    kind = sniff(data[:8])
    if kind is None:
        raise UploadRefused(f"the {what} upload is not a TIFF, .npy or .npz file (it starts with {data[:8]!r}); "
                            "upload one of those", status=415)
    return kind


def check_shape(shape: tuple[int, ...], what: str = "image", limits: UploadLimits = UploadLimits()) -> None:
    """Refuse a shape with too few or too many dimensions, or more voxels than the cap."""
    if not limits.min_dims <= len(shape) <= limits.max_dims:
        raise UploadRefused(f"the {what} has shape {tuple(shape)}: give a {limits.min_dims}D to {limits.max_dims}D "
                            "array (2D image, 3D stack or volume)")
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels == 0:
        raise UploadRefused(f"the {what} has shape {tuple(shape)}, no pixels; upload a non-empty array")
    if voxels > limits.max_voxels:
        raise UploadRefused(f"the {what} has {voxels:,} voxels, over the cap of {limits.max_voxels:,}; crop or "
                            "downsample it, or submit it with `dlorch segment` from the command line", status=413)


def check_size(n: int, what: str = "image", limits: UploadLimits = UploadLimits()) -> None:
    if n > limits.max_bytes:
        raise UploadRefused(f"the {what} upload is {n:,} bytes, over the cap of {limits.max_bytes:,}; upload a "
                            "smaller file or use `dlorch segment` from the command line", status=413)
    if n == 0:
        raise UploadRefused(f"the {what} upload is empty; choose a TIFF, .npy or .npz file")


def peek_shape(path: Path, kind: str, what: str = "image") -> tuple[int, ...]:
    """The array's shape read from the file's header alone (nothing decompressed or decoded)."""
    try:
        if kind == "npy":
            with open(path, "rb") as fh:
                return _npy_shape(fh)
        if kind == "npz":
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".npy")]
                if len(names) != 1:
                    raise UploadRefused(f"the {what} .npz holds {len(names)} arrays; upload one array (np.save, or "
                                        "np.savez with a single array)")
                with z.open(names[0]) as fh:
                    return _npy_shape(fh)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UploadRefused(f"the {what} TIFF holds no image; upload a TIFF with pixels")
            return tuple(tif.series[0].shape)
    except UploadRefused:
        raise
    except Exception as e:
        raise UploadRefused(f"cannot read the {what} upload as {kind}: {type(e).__name__}: {one_line(e)}; "
                            "check the file opens in Fiji or NumPy") from None


def _npy_shape(fh) -> tuple[int, ...]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)  # the header only: nothing unpickled, nothing decoded
    if dtype.kind not in "biuf":
        raise UploadRefused(f"the upload holds {dtype} values, not numbers; save an array of numbers with np.save")
    return tuple(shape)


def read_upload(data: bytes, what: str = "image", limits: UploadLimits = UploadLimits()) -> np.ndarray:
    """Check an uploaded file (size, type, shape from its header) and decode it; one line if refused."""
    from dlorch.core.imageio import read_image

    check_size(len(data), what, limits)
    kind = check_type(data, what)
    with tempfile.TemporaryDirectory(prefix="dlorch-upload-") as tmp:
        path = Path(tmp) / f"upload{KINDS[kind]}"
        path.write_bytes(data)
        check_shape(peek_shape(path, kind, what), what, limits)
        array = read_image(path, role=what)
    check_shape(array.shape, what, limits)  # a TIFF's series may hide pages: the decoded array decides
    return array


async def read_body(receive_stream, length_header: str | None, what: str = "image",
                    limits: UploadLimits = UploadLimits()) -> bytes:
    """A request body, refused as soon as it passes the cap (``Content-Length`` first, then the bytes).

    Args:
        receive_stream: an async iterator of byte chunks (Starlette's ``request.stream()``).
        length_header: the request's ``Content-Length``, if any.
    """
    if length_header is not None:
        try:
            declared = int(length_header)
        except ValueError:
            raise UploadRefused("bad Content-Length header", status=400) from None
        if declared:
            check_size(declared, what, limits)
    chunks, total = [], 0
    async for chunk in receive_stream:
        total += len(chunk)
        if total > limits.max_bytes:
            check_size(total, what, limits)
        chunks.append(chunk)
    data = b"".join(chunks)
    check_size(len(data), what, limits)
    return data


def install_error_handlers(app: Any) -> None:
    """Answer a ``DlorchError`` raised by a route with its one line as JSON ``{"detail": ...}`` (an upload's
    refusal with its own status, other bad input with 400), never a traceback."""
    from fastapi.responses import JSONResponse

    from dlorch.core.errors import DlorchError

    async def handler(request, exc: DlorchError):
        status = getattr(exc, "status", 400)
        return JSONResponse({"detail": one_line(exc)}, status_code=status)

    app.add_exception_handler(DlorchError, handler)
