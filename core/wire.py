"""Signed JSON messages: the only thing that crosses the queue. Never pickle, never code."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any


class ForgedMessage(Exception):
    """A message whose signature is missing or wrong; it is dropped, never acted on."""


class Signer:
    """HMAC-SHA256 over canonical JSON with a shared secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("an empty secret would sign nothing")
        self._key = hashlib.sha256(b"dlorch-wire-v1" + secret).digest()

    def seal(self, message: dict[str, Any]) -> bytes:
        """Serialise and sign: ``<json>\\n<hex signature>``."""
        body = json.dumps(message, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        return body + b"\n" + self._sign(body)

    def open(self, data: bytes | str) -> dict[str, Any]:
        """Verify and parse; raises ForgedMessage on any mismatch."""
        if isinstance(data, str):
            data = data.encode()
        body, sep, sig = data.rpartition(b"\n")
        if not sep or not hmac.compare_digest(sig, self._sign(body)):
            raise ForgedMessage(f"bad or missing signature on a {len(data)}-byte message")
        try:
            message = json.loads(body)
        except ValueError as e:
            raise ForgedMessage(f"signed message is not JSON: {e}") from None
        if not isinstance(message, dict):
            raise ForgedMessage("signed message is not a JSON object")
        return message

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
