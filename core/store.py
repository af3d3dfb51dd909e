"""The data store: images, checkpoints and results under one fsspec URL (a directory or ``s3://``).

Keys are relative paths under the store root. Writes go to a temporary key and are published by a
rename (local) or copy (object stores), so a reader never sees a half-written object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from fsspec.core import url_to_fs

from dlorch.core.errors import BadInput, Unreachable, redact
from dlorch.core.sources import Sources


def local_path(url: str) -> Path | None:
    """The local directory a store URL names, or None for a remote store."""
    p = urlparse(url)
    if p.scheme in ("", "file") or (len(p.scheme) == 1 and os.name == "nt"):  # C:\ on Windows
        return Path(p.path if p.scheme == "file" else url).expanduser().resolve()
    return None


def sha256_of(path: Path) -> str:
    """Content hash of a file, or of a directory tree (relative names and bytes, in sorted order)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(f, h)
    else:
        _hash_file(path, h)
    return h.hexdigest()


def _hash_file(path: Path, h: "hashlib._Hash") -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def image_suffix(path: Path) -> str:
    """The suffix that tells the image format (``.ome.tif`` and ``.zarr`` included)."""
    name = path.name.lower()
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


class DataStore:
    """Blobs, checkpoints and outputs under one root URL.

    A node's store is given ``allow``, the URL prefixes its deployment allows besides the store
    (``DLORCH_ALLOW_URLS``): it then reads and writes nothing else (``core/sources.py``), whatever a
    job names. A client's store (``allow`` None) reads what its own user names.
    """

    def __init__(self, url: str, allow: Iterable[str] | None = None, **storage_options) -> None:
        local = local_path(url)
        self.url = str(local) if local else url.rstrip("/")
        self.local_root = local
        self.sources = Sources(self.url, tuple(allow)) if allow is not None else None
        try:
            self.fs, self.root = url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as e:
            raise BadInput(f"cannot use store {url!r}: {e}") from None

    def uri(self, key: str) -> str:
        """The full URL of a key."""
        return f"{self.url}/{key}"

    def check_source(self, uri_or_key: str, action: str = "read") -> None:
        """Raise ``BadInput`` if this is a node's store and ``uri_or_key`` lies outside what it may ``action``."""
        if self.sources is not None:
            is_key = "://" not in uri_or_key and not os.path.isabs(uri_or_key)
            self.sources.check(self.uri(uri_or_key) if is_key else uri_or_key, action)

    def _path(self, uri_or_key: str, action: str = "read") -> str:
        self.check_source(uri_or_key, action)  # before anything is opened
        if uri_or_key.startswith(self.url + "/"):
            uri_or_key = uri_or_key[len(self.url) + 1 :]
        if "://" in uri_or_key or os.path.isabs(uri_or_key):
            return url_to_fs(uri_or_key)[1]
        return f"{self.root}/{uri_or_key}"

    def _fs_for(self, uri: str):
        self.check_source(uri)
        if uri.startswith(self.url + "/") or "://" not in uri and not os.path.isabs(uri):
            return self.fs
        return url_to_fs(uri)[0]

    def exists(self, uri_or_key: str) -> bool:
        """Whether an object (or directory) exists."""
        return self._guard(lambda: self._fs_for(uri_or_key).exists(self._path(uri_or_key)))

    def size(self, uri_or_key: str) -> int:
        """Bytes of an object (a directory: all its files)."""
        fs, path = self._fs_for(uri_or_key), self._path(uri_or_key)
        return self._guard(lambda: fs.du(path, total=True) if fs.isdir(path) else fs.size(path))

    def version(self, uri_or_key: str) -> str:
        """What changes when an object is rewritten: ``SIZE:TAG``, the tag its ETag (object stores, HTTP) or mtime.

        Raises:
            FileNotFoundError: nothing is stored there.
        """
        fs, path = self._fs_for(uri_or_key), self._path(uri_or_key)

        def _do() -> str:
            info = fs.info(path)
            if info.get("type") == "directory":
                return f"{fs.du(path, total=True)}:dir"
            tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            return f"{info.get('size')}:{tag}"

        return self._guard(_do)

    def put_file(self, local: Path, key: str, *, link: bool = False) -> str:
        """Upload a file or directory to ``key``, published atomically; returns its URI.

        ``link``: the caller never writes to the file again (it may delete it), so a local store on the
        same filesystem may hard-link it instead of copying the bytes (a 31 MB checkpoint every epoch).
        """
        dest = self._path(key, "write")
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"

        def _do() -> None:
            self.fs.makedirs(os.path.dirname(dest), exist_ok=True)
            if self.local_root is not None:
                if local.is_dir():
                    shutil.copytree(local, tmp)
                elif not (link and _linked(local, tmp)):
                    shutil.copyfile(local, tmp)
                if local.is_dir() and os.path.exists(dest):
                    shutil.rmtree(tmp)  # a content-addressed dir already published: same bytes
                    return
                os.replace(tmp, dest)
            else:
                self.fs.put(str(local), tmp, recursive=local.is_dir())
                self.fs.mv(tmp, dest, recursive=local.is_dir())

        self._guard(_do)
        return self.uri(key)

    def put_blob(self, local: Path) -> str:
        """Upload an input content-addressed (the same image is stored once); returns its URI."""
        if not local.exists():
            raise BadInput(f"file not found: {local}")
        key = f"blobs/{sha256_of(local)}{image_suffix(local)}"
        if self.exists(key):
            return self.uri(key)
        return self.put_file(local, key)

    def get_file(self, uri: str, local: Path) -> Path:
        """Download an object (or directory) to ``local``, atomically."""
        fs = self._fs_for(uri)
        src = self._path(uri)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")

        def _do() -> None:
            if not fs.exists(src):
                raise BadInput(f"not found in the store: {uri}")
            if fs.isdir(src):
                fs.get(src, str(tmp), recursive=True)
                if local.exists():
                    shutil.rmtree(local) if local.is_dir() else local.unlink()
            else:
                fs.get(src, str(tmp))
            os.replace(tmp, local)

        self._guard(_do)
        return local

    def read_bytes(self, uri: str) -> bytes:
        """Read a small object whole."""
        return self._guard(lambda: self._fs_for(uri).cat_file(self._path(uri)))

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write a small object atomically; returns its URI."""
        dest = self._path(key, "write")
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"

        def _do() -> None:
            self.fs.makedirs(os.path.dirname(dest), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, dest)

        self._guard(_do)
        return self.uri(key)

    def listing(self, prefix: str, maxdepth: int | None = None) -> dict[str, int]:
        """The keys under ``prefix`` (files and folders, ``maxdepth`` levels down) and their bytes (a folder: 0)."""
        path, root = self._path(prefix), self.root.rstrip("/") + "/"

        def _do() -> dict[str, int]:
            if not self.fs.exists(path):
                return {}
            found = self.fs.find(path, maxdepth=maxdepth, withdirs=True, detail=True)
            return {p[len(root):] if p.startswith(root) else p: 0 if info.get("type") == "directory"
                    else int(info.get("size") or 0) for p, info in found.items()}

        return self._guard(_do)

    def delete(self, key: str) -> None:
        """Delete an object, or a folder and all it holds; nothing there is no error."""
        path = self._path(key, "write")

        def _do() -> None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=self.fs.isdir(path))

        self._guard(_do)

    def _guard(self, fn):
        try:
            return fn()
        except (BadInput, FileNotFoundError):
            raise
        except (ConnectionError, TimeoutError, OSError) as e:
            if self.local_root is not None and not isinstance(e, (ConnectionError, TimeoutError)):
                raise
            raise Unreachable(f"store {redact(self.url)} unreachable: {redact(str(e))}; "
                              "check the URL and credentials") from None


def _linked(src: Path, dest: str) -> bool:
    """Hard-link ``src`` at ``dest``; False where the filesystem cannot (another device, no links)."""
    try:
        os.link(src, dest)
        return True
    except OSError:
        return False
