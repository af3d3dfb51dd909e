"""Settings shared by every role, from options, ``DLORCH_*`` environment variables or defaults."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    """The embedded default's state directory: ``$DLORCH_HOME`` or ``~/.dlorch``."""
    return Path(os.environ.get("DLORCH_HOME") or Path.home() / ".dlorch")


# DLORCH_PRECISION: the compute precision, as Lightning names it. "32" keeps everything in float32
# (e.g. for outputs comparable across nodes with and without bf16 units); "bf16" asks for bf16
# autocast. Unset: the engine chooses per device (``engine.device.detect_runtime``).
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}


def requested_precision() -> str | None:
    """The precision ``DLORCH_PRECISION`` asks for (a Lightning precision name), None when unset.

    Raises:
        BadInput: any other value; the CLI checks it before a command runs.
    """
    wanted = os.environ.get("DLORCH_PRECISION", "").strip().lower()
    if not wanted:
        return None
    if wanted not in PRECISIONS:
        from dlorch.core.errors import BadInput

        raise BadInput(f"DLORCH_PRECISION={wanted!r} is not a precision; set it to {' or '.join(PRECISIONS)}, "
                       "or unset it to let each device choose")
    return PRECISIONS[wanted]


class Settings(BaseSettings):
    """Where state lives and how the pieces talk. Empty URLs mean the embedded default."""

    model_config = SettingsConfigDict(env_prefix="DLORCH_", extra="ignore")

    store: str = Field("", description="state/data store URL: a directory, file:// or s3://")
    queue: str = Field("", description="queue URL: sqlite:///path.db or redis://host:port/db")
    secret: str = Field("", description="shared HMAC secret for queue messages")
    lease_s: float = Field(30.0, gt=0, description="a node holds a job this long without a heartbeat")
    heartbeat_s: float = Field(3.0, gt=0, description="how often agents heartbeat")
    max_attempts: int = Field(3, ge=1, description="failed attempts in a row (errors) before a job is failed")
    max_node_losses: int = Field(8, ge=1, description="nodes lost in a row without progress before a job is failed")
    cache_gb: float = Field(50.0, gt=0, description="a node's cache of inputs and models, in GB; beyond it the "
                            "copies used least recently are evicted")
    allow_urls: str = Field("", description="URL prefixes nodes may read and write besides the store, separated by "
                            "commas (e.g. s3://lab-data/); unset: the store only")
    deployment: str = Field("default", description="this deployment's name: the fleet tags the machines it launches "
                            "with it and lists only those")

    def resolved_store(self) -> str:
        """The store URL, defaulting to the embedded state directory."""
        if self.store:
            return self.store
        return str(default_home())

    def allowed_urls(self) -> tuple[str, ...]:
        """The prefixes of ``DLORCH_ALLOW_URLS``: where nodes may read and write besides the store."""
        from dlorch.core.sources import parse_prefixes

        return parse_prefixes(self.allow_urls)

    def resolved_queue(self) -> str:
        """The queue URL, defaulting to a SQLite file in the local store."""
        if self.queue:
            return self.queue
        from dlorch.core.store import local_path

        root = local_path(self.resolved_store())
        if root is None:
            from dlorch.core.errors import BadInput

            raise BadInput("a remote --store needs a shared --queue (e.g. redis://host:6379/0); set DLORCH_QUEUE")
        return f"sqlite:///{root / 'queue.db'}"

    def resolved_secret(self) -> bytes:
        """The HMAC key: ``DLORCH_SECRET`` or a key file created once in the local store."""
        if self.secret:
            return self.secret.encode()
        from dlorch.core.store import local_path

        root = local_path(self.resolved_store())
        if root is None:
            from dlorch.core.errors import BadInput

            raise BadInput("distributed mode needs a shared secret: set DLORCH_SECRET on every node")
        key_file = root / "secret.key"
        if not key_file.exists():
            root.mkdir(parents=True, exist_ok=True)
            tmp = key_file.with_suffix(f".{os.getpid()}.tmp")
            # 0600 from its first byte: the key signs every message, so no other user may read it
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32).hex().encode())
            try:
                os.link(tmp, key_file)  # first writer wins; others read its key
            except FileExistsError:
                pass
            except OSError:
                if not key_file.exists():
                    os.replace(tmp, key_file)
            tmp.unlink(missing_ok=True)
        if key_file.stat().st_mode & 0o077:
            try:
                key_file.chmod(0o600)  # a key made by an older version, readable by others
            except OSError:
                pass
        key = key_file.read_bytes().strip()
        if not key:
            from dlorch.core.errors import BadInput

            raise BadInput(f"{key_file} is empty; delete it (a new key is made) or set DLORCH_SECRET")
        return key
