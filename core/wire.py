"""Signed JSON messages: the only thing that crosses the queue. Never pickle, never code."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any


MAX_MESSAGE_BYTES = 64 << 20  # a split of a large volume lists every block; anything larger is not ours


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


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
        if len(data) > MAX_MESSAGE_BYTES:
            raise ForgedMessage(f"a {len(data)}-byte message is larger than any dlorch sends")
        body, sep, sig = data.rpartition(b"\n")
        if not sep or not hmac.compare_digest(sig, self._sign(body)):
            raise ForgedMessage(f"bad or missing signature on a {len(data)}-byte message")
        try:
            message = json.loads(body, parse_constant=_no_constant)  # NaN, Infinity: never sealed, never taken
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser goes
            raise ForgedMessage(f"signed message is not JSON: {type(e).__name__}: {e}") from None
        if not isinstance(message, dict):
            raise ForgedMessage("signed message is not a JSON object")
        return message

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
