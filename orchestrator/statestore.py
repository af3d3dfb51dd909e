"""The ledger's storage seam: small JSON records with compare-and-set writes.

A backend is a handful of methods: ``get`` returns bytes and an etag, ``put`` writes only if the
stored etag is the expected one (``if_match``) or nothing is stored yet (``if_none_match``).
The local-directory backend is the embedded default; an S3 backend (conditional PUTs) plugs in here.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

from dlorch.core.errors import StaleWrite


class StateStore(Protocol):
    """Small records under string keys, written compare-and-set."""

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The record and its etag, or None."""

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write a record; raise StaleWrite if the condition fails. Returns the new etag."""

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix, sorted."""

    def delete(self, key: str) -> None:
        """Remove a record; none there is no error."""


def etag_of(data: bytes) -> str:
    """A record's etag: the hash of its bytes."""
    return hashlib.sha1(data).hexdigest()


class LocalDirStateStore:
    """Records as files in a directory; atomic rename writes, a lock directory per key for CAS."""

    STALE_LOCK_S = 30.0

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.Lock()

    def _file(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._file(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._mutex, self._lock(path):
            if if_match is not None or if_none_match:
                current = self.get(key)
                if if_none_match and current is not None:
                    raise StaleWrite(f"{key} already exists")
                if if_match is not None and (current is None or current[1] != if_match):
                    raise StaleWrite(f"{key} changed underneath (expected etag {if_match[:8]})")
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return etag_of(data)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(f"{prefix.rstrip('/')}/{p.stem}" for p in base.glob("*.json"))

    def delete(self, key: str) -> None:
        path = self._file(key)
        with self._mutex, self._lock(path):
            path.unlink(missing_ok=True)

    def _lock(self, path: Path) -> "_DirLock":
        return _DirLock(path.with_name(f".{path.name}.lock"), self.STALE_LOCK_S)


class _DirLock:
    """A cross-process lock: ``mkdir`` is atomic on every OS. A lock older than ``stale_s`` is broken."""

    def __init__(self, path: Path, stale_s: float) -> None:
        self.path, self.stale_s = path, stale_s

    def __enter__(self) -> "_DirLock":
        deadline = time.monotonic() + 2 * self.stale_s
        while True:
            try:
                os.mkdir(self.path)
                return self
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > self.stale_s:
                        os.rmdir(self.path)  # its holder died mid-write
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {self.path} held too long") from None
                time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass


def open_state_store(store_url: str) -> StateStore:
    """The ledger backend for a store URL: ``<store>/ledger`` locally."""
    from dlorch.core.errors import BadInput
    from dlorch.core.store import local_path

    root = local_path(store_url)
    if root is not None:
        return LocalDirStateStore(root / "ledger")
    if store_url.startswith("s3://"):
        import os

        from dlorch.orchestrator.s3state import S3StateStore

        bucket, _, prefix = store_url[len("s3://"):].partition("/")
        if not bucket:
            raise BadInput(f"store URL {store_url!r} names no bucket; use s3://bucket/prefix")
        return S3StateStore(bucket, f"{prefix.strip('/')}/ledger".lstrip("/"),
                            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    raise BadInput(f"unsupported store URL {store_url!r}; use a directory or s3://bucket/prefix")
