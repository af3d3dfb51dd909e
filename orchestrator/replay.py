"""Which queued requests the orchestrator refuses before looking at them: duplicates, stale ones, old heartbeats.

Pure: memory and the time given. ``Orchestrator.accept`` asks ``ReplayGuard.check`` about every request's
envelope (``core/protocol.py``) and refuses:

* a duplicate: the same (sender, request id) as a request accepted within ``FRESH_S``. It is not applied
  again; the reply kept from the first time is sent again, if still at hand (the asker may have lost the
  first in a queue restart, and re-sends its request with the same id);
* a stale request: sent more than ``FRESH_S`` before, or after, the orchestrator's ``now``. A duplicate
  older than that is stale, so remembering ``FRESH_S`` worth of request ids catches every replay. Send
  times are in the orchestrator's clock as the sender learnt it from replies (``orchestrator/queue.py``),
  so a sender whose wall clock is off is judged fairly; one refused as stale learns the clock from the
  refusal and sends again at once;
* a superseded heartbeat: older than the newest heartbeat accepted from its sender (a backlog's old
  heartbeats say nothing the newer one did not, and must not keep a lease that has ended).
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum
from typing import Any

from dlorch.core.protocol import FRESH_S, Envelope


class Refused(str, Enum):
    """Why an envelope is refused before its request is looked at."""

    DUPLICATE = "a duplicate of a request already handled"
    STALE = "sent too long before (or after) the orchestrator's clock; stamp it again and resend"
    SUPERSEDED = "a heartbeat older than one already received from this node"


class ReplayGuard:
    """Remembers the requests accepted within ``FRESH_S``, and says which new ones to refuse.

    Memory is bounded: request ids older than the window are forgotten (their replays are stale), and beyond
    ``capacity`` the oldest are forgotten early, raising a floor below which every send time is refused.
    """

    def __init__(self, fresh_s: float = FRESH_S, capacity: int = 200_000, replies: int = 1024) -> None:
        self.fresh_s, self.capacity, self.reply_capacity = fresh_s, capacity, replies
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # (sender, rid) -> send time
        self._floor = float("-inf")
        self._heartbeats: dict[str, float] = {}  # sender -> newest heartbeat's send time
        self._replies: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def check(self, env: Envelope, kind: Any, now: float) -> Refused | None:
        """Refuse ``env`` (a ``kind`` request) or accept it, remembering it as handled."""
        self._forget(now)
        key = (env.sender, env.rid)
        if key in self._seen:
            return Refused.DUPLICATE
        if abs(now - env.sent_at) > self.fresh_s or env.sent_at <= self._floor:
            return Refused.STALE
        if kind == "heartbeat":
            if env.sent_at < self._heartbeats.get(env.sender, float("-inf")):
                return Refused.SUPERSEDED
            self._heartbeats[env.sender] = env.sent_at
        self._seen[key] = env.sent_at
        return None

    def keep_reply(self, env: Envelope, reply: dict[str, Any]) -> None:
        """Keep a reply to send again if its request comes again (the first may have been lost)."""
        self._replies[(env.sender, env.rid)] = reply
        while len(self._replies) > self.reply_capacity:
            self._replies.popitem(last=False)

    def reply_to(self, env: Envelope) -> dict[str, Any] | None:
        """The reply kept for a duplicate, if any."""
        return self._replies.get((env.sender, env.rid))

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, sent_at = next(iter(seen.items()))
            if sent_at >= now - self.fresh_s and len(seen) <= self.capacity:
                break
            if len(seen) > self.capacity:
                self._floor = max(self._floor, sent_at)
            del seen[key]
        if len(self._heartbeats) > self.capacity:
            self._heartbeats = {s: t for s, t in self._heartbeats.items() if t >= now - self.fresh_s}
