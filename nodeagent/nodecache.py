"""The node cache: store objects fetched once per node, each copy checked by its content before it is used.

Models and inputs land under the node's cache directory, each with a record (``records/<name>.json``):
the sha256 of the copy, the version of the store object it was fetched from (size, and ETag or
modification time) and its bytes; the record's modification time is the copy's last use. A blob is
named by its sha256 (``put_blob``); any other copy must hash to its record, and the store object must
still be the version it was fetched as. A copy that fails is fetched again. A download is published by
rename, so a node killed mid-download leaves no truncated copy behind. ``trim_cache`` keeps the cache
under its size cap by evicting the copies used least recently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from dlorch.core.errors import BadInput, Unreachable
from dlorch.core.store import DataStore, sha256_of

log = logging.getLogger("dlorch.agent")

RECORDS = "records"  # the records' folder inside the cache (no cached name can be this: see _cache_name)


def fetch_cached(store: DataStore, cache: Path, uri: str, timings: dict[str, float]) -> Path:
    """Fetch a store object once per node, checking a cached copy by its content before it is used.

    A blob's copy must hash to its name; another copy must hash to the sha256 recorded when it was
    fetched, and the store object must still be the version fetched then (a rewritten object is
    fetched again). Hashes are checked once per process while the copy's file stays untouched, not
    once per block. A copy that fails is deleted and fetched again. Downloads are counted in
    ``timings["downloads"]``: a model reaches each node once, not once per block.
    """
    store.check_source(uri)  # a node reads only its store and the prefixes it allows, cached or not
    local, digest = cache / _cache_name(uri), _blob_digest(uri)
    if local.exists():
        fault = _copy_fault(store, uri, local, digest)
        if fault is None:
            _used(local, digest)
            return local
        log.warning("cached copy %s of %s cannot be used (%s); fetching it again", local, uri, fault)
        _evict(local)
    t0 = time.perf_counter()
    version = _version(store, uri) if digest is None else None
    if digest is not None and not store.exists(uri):
        raise BadInput(f"not found in the store: {uri}")
    tmp = local.with_name(f".{local.name}.fetch-{uuid.uuid4().hex[:8]}")
    try:
        store.get_file(uri, tmp)
        sha = sha256_of(tmp)
        fault = _download_fault(tmp, sha, digest, version)
        if fault is not None:
            raise BadInput(f"{uri} in the store is damaged ({fault}); submit the file again")
        if not local.exists():  # else another worker of this node published it meanwhile: keep theirs
            _write_record(local, {"sha256": sha, "version": version, "bytes": _bytes(tmp)})
            os.replace(tmp, local)
            _remember(local, sha)
    finally:
        _remove(tmp)
    timings["download_s"] = timings.get("download_s", 0.0) + time.perf_counter() - t0
    timings["downloads"] = timings.get("downloads", 0) + 1
    return local


def _cache_name(uri: str) -> str:
    """A blob keeps its name (``<sha256><suffix>``); another object is prefixed with a hash of its URI."""
    name = uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name if _blob_digest(uri) is not None else f"{hashlib.sha1(uri.encode()).hexdigest()[:12]}-{name}"


def _blob_digest(uri: str) -> str | None:
    """The sha256 a blob's name declares (``put_blob`` names blobs by content), or None for another object."""
    path = "/" + uri.replace("\\", "/").rstrip("/")
    head, _, name = path.rpartition("/")
    m = re.match(r"[0-9a-f]{64}", name)
    return m.group(0) if m and head.endswith("/blobs") else None


def _version(store: DataStore, uri: str) -> str:
    try:
        return store.version(uri)
    except FileNotFoundError:
        raise BadInput(f"not found in the store: {uri}") from None


def _copy_fault(store: DataStore, uri: str, local: Path, digest: str | None) -> str | None:
    """Why a cached copy of ``uri`` cannot be used, or None if its content is what was fetched."""
    if digest is None:
        record = _read_record(local)
        if not record.get("sha256") or not record.get("version"):
            return "no record of its content"
        try:
            current = _version(store, uri)
        except Unreachable as e:  # the copy's content is checked below: better than no work at all
            log.warning("cannot check cached copy %s against the store (%s); using it", local, e)
            current = record["version"]
        if current != record["version"]:
            return f"the store's object is now version {current}, the copy is of {record['version']}"
        digest = record["sha256"]
    return _content_fault(local, digest)


def _download_fault(tmp: Path, sha: str, digest: str | None, version: str | None) -> str | None:
    """Why a fresh download is not the store object: a blob that does not hash to its name, a short copy."""
    if digest is not None and sha != digest:
        return f"sha256 {sha[:12]}... is not the {digest[:12]}... of its name"
    size = (version or "").split(":", 1)[0]
    if size.isdigit() and int(size) != _bytes(tmp):
        return f"{_bytes(tmp)} bytes, the store's copy has {size}"
    return None


# -- hashes checked by this process -------------------------------------------------------------------
_verified: dict[str, tuple[tuple, str]] = {}  # copy path -> (its file stamp, the sha256 it was found to have)
_verified_lock = threading.Lock()


def _content_fault(local: Path, digest: str) -> str | None:
    stamp = _stamp(local)
    with _verified_lock:
        if _verified.get(str(local)) == (stamp, digest):
            return None
    actual = sha256_of(local)
    if actual != digest:
        return f"sha256 {actual[:12]}... is not the {digest[:12]}... it was fetched with"
    with _verified_lock:
        _verified[str(local)] = (stamp, digest)
    return None


def _remember(local: Path, sha: str) -> None:
    with _verified_lock:
        _verified[str(local)] = (_stamp(local), sha)


def _stamp(path: Path) -> tuple:
    """What changes when a file is written, even to the same size and a restored mtime (ctime, inode)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for f in files for st in [f.stat()])


# -- records, use and eviction ---------------------------------------------------------------------------
def _record_path(local: Path) -> Path:
    return local.parent / RECORDS / f"{local.name}.json"


def _read_record(local: Path) -> dict:
    try:
        record = json.loads(_record_path(local).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(local: Path, record: dict) -> None:
    path = _record_path(local)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _used(local: Path, digest: str | None) -> None:
    """Mark a copy used now (its record's mtime); a blob copy cached before records existed gets one."""
    path = _record_path(local)
    try:
        os.utime(path)
    except FileNotFoundError:
        if digest is not None:
            _write_record(local, {"sha256": digest, "version": None, "bytes": _bytes(local)})


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _evict(local: Path) -> None:
    _remove(local)
    _record_path(local).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    with _verified_lock:
        _verified.pop(str(path), None)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


class Entry(NamedTuple):
    """A cached copy as eviction sees it."""

    name: str
    bytes: int
    last_used: float  # seconds since the epoch


def evictions(entries: list[Entry], max_bytes: int, now: float, min_idle_s: float) -> list[str]:
    """The copies to evict so that the rest fit in ``max_bytes``: the least recently used first.

    A copy used within ``min_idle_s`` is never evicted (an attempt on this machine may be reading it),
    so the cap may be exceeded while the copies in use alone exceed it.
    """
    kept, out = 0, []
    for e in sorted(entries, key=lambda e: e.last_used, reverse=True):
        if kept + e.bytes <= max_bytes or now - e.last_used < min_idle_s:
            kept += e.bytes
        else:
            out.append(e.name)
    return out


STALE_DOWNLOAD_S = 3600.0  # a temporary this old is a download whose node was killed


def trim_cache(cache: Path, max_bytes: int, min_idle_s: float = 600.0) -> list[str]:
    """Evict the least recently used copies beyond ``max_bytes``, and what killed downloads left; returns the names.

    Never raises: a cache that cannot be trimmed now is trimmed the next time.
    """
    try:
        return _trim(cache, max_bytes, min_idle_s)
    except OSError as e:
        log.warning("could not trim the node cache %s: %s", cache, e)
        return []


def _trim(cache: Path, max_bytes: int, min_idle_s: float) -> list[str]:
    if not cache.is_dir():
        return []
    now, entries = time.time(), []
    for path in cache.iterdir():
        if path.name == RECORDS:
            continue
        if path.name.startswith("."):  # a download in progress, or left by a killed node
            if now - path.stat().st_mtime > STALE_DOWNLOAD_S:
                _remove(path)
            continue
        record, rpath = _read_record(path), _record_path(path)
        size = record.get("bytes") if isinstance(record.get("bytes"), int) else _bytes(path)
        used = rpath.stat().st_mtime if rpath.exists() else path.stat().st_mtime
        entries.append(Entry(path.name, size, used))
    victims = evictions(entries, max_bytes, now, min_idle_s)
    for name in victims:
        _evict(cache / name)
        log.info("evicted %s from the node cache (least recently used; cap %d bytes)", name, max_bytes)
    records = cache / RECORDS
    for rec in records.iterdir() if records.is_dir() else []:  # records whose copy is gone, or never came
        orphan = rec.name.startswith(".") or not (cache / rec.stem).exists()
        if orphan and now - rec.stat().st_mtime > STALE_DOWNLOAD_S:  # not a download about to publish
            rec.unlink(missing_ok=True)
    return victims
