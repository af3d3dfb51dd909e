"""Where a node may read inputs and write outputs: its store, and the URL prefixes its deployment allows.

A job spec is untrusted input: whoever holds the queue's key, or a buggy client, can name any path
(``/etc/passwd``), any ``file://`` URL or a cloud metadata endpoint (``http://169.254.169.254/``).
A node therefore reads and writes only under its own store URL and under the prefixes set in
``DLORCH_ALLOW_URLS`` on that node (e.g. ``s3://lab-data/,https://data.example.org/em/``). The CLI
uploads local files into the store at submission, so the embedded default needs no prefix at all.

The check is pure: URLs are parsed and normalised, never opened.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from dlorch.core.errors import BadInput

ALLOW_SETTING = "DLORCH_ALLOW_URLS"


def file_url_path(url: str) -> str | None:
    """The path a ``file://`` URL names on this machine, or None for any other reference."""
    p = urlparse(url)
    return unquote(p.path) if p.scheme == "file" and p.netloc in ("", "localhost") else None


def parse_prefixes(text: str) -> tuple[str, ...]:
    """The prefixes of a ``DLORCH_ALLOW_URLS`` value: separated by commas or white space."""
    return tuple(p for p in text.replace(",", " ").split() if p)


@dataclass(frozen=True)
class _Place:
    """A URL reduced to what decides where it points: scheme, host and normalised path segments."""

    scheme: str
    host: str
    parts: tuple[str, ...]

    def under(self, prefix: "_Place") -> bool:
        return (self.scheme, self.host) == (prefix.scheme, prefix.host) \
            and self.parts[:len(prefix.parts)] == prefix.parts


def _place(url: str) -> _Place | None:
    """Where ``url`` points, or None for a URL no node should open (``..`` segments, chained ``a::b`` URLs)."""
    if "::" in url or "\0" in url:
        return None
    p = urlparse(url)
    windows_drive = len(p.scheme) == 1 and os.name == "nt"
    if p.scheme in ("", "file") or windows_drive:
        path = unquote(p.path) if p.scheme == "file" else url
        if p.scheme == "file" and p.netloc not in ("", "localhost"):
            return None  # file://host/path: another machine's file
        path = os.path.normpath(os.path.abspath(os.path.expanduser(path))).replace("\\", "/")
        return _Place("file", "", tuple(s for s in path.split("/") if s))
    segments = unquote(p.path).split("/")
    if any(s in ("..", ".") for s in segments) or "\\" in p.path:
        return None  # an object store keeps such keys literally, an HTTP server may not: never guess
    path = posixpath.normpath("/" + "/".join(segments))
    return _Place(p.scheme.lower(), p.netloc.lower(), tuple(s for s in path.split("/") if s))


@dataclass(frozen=True)
class Sources:
    """The places a node may touch: its store URL and the allowed prefixes."""

    store: str
    allowed: tuple[str, ...] = ()

    def allows(self, url: str) -> bool:
        """Whether ``url`` lies under the store or an allowed prefix (on whole path segments)."""
        place = _place(url)
        if place is None:
            return False
        for prefix in (self.store, *self.allowed):
            root = _place(prefix)
            if root is not None and place.under(root):
                return True
        return False

    def check(self, url: str, action: str = "read") -> str:
        """``url`` itself if the node may ``action`` ("read" or "write") it; else ``BadInput`` saying what to do.

        Raises:
            BadInput: the URL is outside the store and every allowed prefix. The job cannot work on
                any node of this deployment, so it fails without retries.
        """
        if self.allows(url):
            return url
        allowed = ", ".join(self.allowed) if self.allowed else "none set"
        raise BadInput(f"refused to {action} {url}: nodes {action} only the store ({self.store}) and the "
                       f"prefixes in {ALLOW_SETTING} ({allowed}); submit local files with the dlorch CLI, which "
                       f"uploads them, or add the URL's prefix to {ALLOW_SETTING} on every node")

