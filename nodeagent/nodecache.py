"""The node cache: store objects fetched once per node, each copy checked before it is used.

Models and inputs land under the node's cache directory. A content-addressed blob is checked
against the sha256 of its name (hashed once per process), any other object against the store's
size; a damaged copy is fetched again, and a download is published by rename, so a node killed
mid-download leaves no truncated copy behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from dlorch.core.errors import BadInput, Unreachable
from dlorch.core.store import DataStore, sha256_of

log = logging.getLogger("dlorch.agent")


def fetch_cached(store: DataStore, cache: Path, uri: str, timings: dict[str, float]) -> Path:
    """Fetch a store object once per node, checking a cached copy before it is used.

    A blob (``.../blobs/<sha256><suffix>``) is content-addressed: its copy must hash to its name
    (hashed once per process, not per block). Another object's copy must have the store object's
    size. A copy that fails is deleted and fetched again. A download lands under a temporary name
    and is renamed once checked, so a node killed mid-download leaves no truncated copy behind.
    Downloads are counted in ``timings["downloads"]``: a model reaches each node once, not once per block.
    """
    store.check_source(uri)  # a node reads only its store and the prefixes it allows, cached or not
    name = uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    digest = _blob_digest(uri)
    if digest is None:
        name = f"{hashlib.sha1(uri.encode()).hexdigest()[:12]}-{name}"
    local = cache / name
    if local.exists():
        fault = _copy_fault(store, uri, local, digest)
        if fault is None:
            return local
        log.warning("cached copy %s of %s is damaged (%s); fetching it again", local, uri, fault)
        _remove(local)
    if not store.exists(uri):
        raise BadInput(f"not found in the store: {uri}")
    t0 = time.perf_counter()
    tmp = local.with_name(f".{local.name}.fetch-{uuid.uuid4().hex[:8]}")
    try:
        store.get_file(uri, tmp)
        fault = _copy_fault(store, uri, tmp, digest)
        if fault is not None:
            raise BadInput(f"{uri} in the store is damaged ({fault}); submit the file again")
        if not local.exists():  # else another worker of this node published it meanwhile: keep theirs
            os.replace(tmp, local)
            if digest is not None:  # hashed as tmp; the rename keeps size and mtime
                with _verified_lock:
                    _verified[str(local)] = _stamp(local)
    finally:
        _remove(tmp)
    timings["download_s"] = timings.get("download_s", 0.0) + time.perf_counter() - t0
    timings["downloads"] = timings.get("downloads", 0) + 1
    return local


_verified: dict[str, tuple[int, int]] = {}  # cached blob copies hashed by this process: path -> (size, mtime)
_verified_lock = threading.Lock()


def _blob_digest(uri: str) -> str | None:
    """The sha256 a blob's name declares (``put_blob`` names blobs by content), or None for another object."""
    path = "/" + uri.replace("\\", "/").rstrip("/")
    head, _, name = path.rpartition("/")
    m = re.match(r"[0-9a-f]{64}", name)
    return m.group(0) if m and head.endswith("/blobs") else None


def _copy_fault(store: DataStore, uri: str, local: Path, digest: str | None) -> str | None:
    """Why a local copy of ``uri`` cannot be used, or None if it matches the store object."""
    if digest is not None:
        stamp = _stamp(local)
        with _verified_lock:
            if _verified.get(str(local)) == stamp:
                return None
        actual = sha256_of(local)
        if actual != digest:
            return f"sha256 {actual[:12]}... is not the {digest[:12]}... of its name"
        with _verified_lock:
            _verified[str(local)] = stamp
        return None
    try:
        want = _store_size(store, uri)
    except Unreachable as e:  # the copy was published whole (rename): better than no work at all
        log.warning("cannot check cached copy %s against the store (%s); using it", local, e)
        return None
    have = sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) if local.is_dir() else local.stat().st_size
    return None if have == want else f"{have} bytes, the store's copy has {want}"


def _store_size(store: DataStore, uri: str) -> int:
    """Bytes of a store object (a directory: all its files)."""
    try:
        return store.size(uri)
    except FileNotFoundError:
        raise BadInput(f"not found in the store: {uri}") from None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _remove(path: Path) -> None:
    with _verified_lock:
        _verified.pop(str(path), None)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
