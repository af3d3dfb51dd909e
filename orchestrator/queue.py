"""The queue: named FIFO-with-priority channels of signed JSON on huey's storage (SQLite or Redis).

We use huey's storage backends (``SqliteHuey`` by default, ``PriorityRedisHuey`` for ``redis://``)
but not its task/consumer layer: huey's messages are pickled, and a dlorch agent's loop must hold
leases and heartbeats around one job at a time, which a generic consumer does not do. Two channels:

* ``jobs``: the orchestrator's dispatch messages ``{job, token}`` to agents (priority, FIFO within);
* ``events``: requests from agents and clients to the orchestrator (the single writer), whose
  replies come back through huey's key-value result store.

What the messages say is ``core/protocol.py``; here each is signed with the channel it is sent on, and
a request with its envelope (request id, sender, send time in the orchestrator's clock as learnt from
its replies). The queue is a cache: every message can be rebuilt from the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from dlorch.core.errors import BadInput, Unreachable, redact
from dlorch.core.protocol import NOW, RESEND
from dlorch.core.wire import ForgedMessage, Signer

log = logging.getLogger("dlorch.queue")


# The tables huey's SqliteStorage keeps (and SQLite its own): all a dlorch queue file may hold.
SQLITE_QUEUE_TABLES = {"kv", "schedule", "task", "counter", "sqlite_sequence"}
# How long opening a SQLite queue waits out another process's write lock (one frozen mid-write by SIGSTOP
# holds it until it runs again) before giving up with one line, instead of failing at SQLite's first timeout.
SQLITE_OPEN_WAIT_S = 120.0


def _open(url: str, name: str, wait_s: float):
    """huey's storage for ``url``; a SQLite file another process holds locked is waited for up to ``wait_s``.

    Raises:
        Unreachable: still locked after ``wait_s`` (one line naming the file and what to do).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _huey(url, name, timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        except sqlite3.OperationalError as e:
            if time.monotonic() >= deadline:
                raise Unreachable(f"cannot open queue {redact(url)}: {e} after {wait_s:.0f}s; another process "
                                  "holds it (a stopped dlorch process: continue it with `kill -CONT PID` or end "
                                  "it)") from None
            time.sleep(0.5)


def _huey(url: str, name: str, timeout: float = 30.0):
    p = urlparse(url)
    if p.scheme == "sqlite":
        from huey import SqliteHuey

        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else p.path
        _check_queue_file(path, url)
        return SqliteHuey(name=name, filename=path, strict_fifo=True, timeout=timeout)
    if p.scheme in ("redis", "rediss", "unix"):
        try:
            p.port  # noqa: B018 -- parses the port, which raises on one out of range
        except ValueError as e:
            raise BadInput(f"bad queue URL {url!r}: {e}; use redis://host:6379/0") from None
        from huey import PriorityRedisHuey
        from redis import ConnectionPool

        # Connect fast-fail; reads may block up to read_timeout in BZPOPMIN, so allow more than that.
        pool = ConnectionPool.from_url(url, socket_connect_timeout=3, socket_timeout=15)
        return PriorityRedisHuey(name=name, connection_pool=pool, read_timeout=1)
    raise BadInput(f"unsupported queue URL {url!r}; use sqlite:///path.db or redis://host:6379/0")


def _check_queue_file(path: str, url: str) -> None:
    """Refuse a SQLite file that holds another application's tables: huey would add its own to it.

    Read-only and before huey opens it, so nothing is written to a database that is not dlorch's.
    A file that is no database at all is left to SQLite's own error, which the queue reports.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error:
        return
    foreign = sorted(tables - SQLITE_QUEUE_TABLES)
    if foreign:
        raise BadInput(f"the queue file {path} is another database (tables {', '.join(foreign[:5])}); give --queue a "
                       f"file of dlorch's own, e.g. sqlite:///{os.path.join(os.path.dirname(path) or '.', 'queue.db')}")


# A SQLite queue is polled: every POLL_BUSY_S at most while messages came in the last
# POLL_IDLE_AFTER_S, every POLL_IDLE_S once it has been quiet. A burst of messages comes within
# milliseconds; an agent's heartbeat every few seconds is no burst, and must not keep the embedded
# orchestrator waking 100 times a second beside a training job that wants both cores (each wake-up
# takes a core from the job's threads, which then wait for each other): it wakes about 20 times.
POLL_BUSY_S = 0.01
POLL_IDLE_AFTER_S = 0.25
POLL_IDLE_S = 0.05

REPLY_TO = "reply_to"  # the request id a reply answers, inside its signed body
CHANNEL = "ch"  # the channel a message was sent on, inside its signed body


class Channel:
    """One named channel: send, receive (verified), and a key-value slot for replies."""

    def __init__(self, url: str, name: str, signer: Signer, open_wait_s: float = SQLITE_OPEN_WAIT_S) -> None:
        self.url, self.name, self.signer = url, name, signer
        self.huey = _open(url, f"dlorch-{name}", open_wait_s)
        self.storage = self.huey.storage
        self.blocking = bool(getattr(self.storage, "blocking", False))
        self.rejected = 0
        self._next_sweep = 0.0  # when put_reply next looks for expired SQLite replies
        self._last_message = 0.0  # when receive last returned a message (the SQLite poll slows when idle)

    def send(self, message: dict[str, Any], priority: int = 0) -> None:
        """Sign and enqueue a message, bound to this channel."""
        data = self.signer.seal({**message, CHANNEL: self.name})
        self._io(lambda: self.storage.enqueue(data, priority))

    def receive(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The next verified message, or None after ``timeout``. Forged messages are logged and dropped."""
        deadline = time.monotonic() + timeout
        # Quick polls while messages are coming; a quiet channel starts at the idle pace.
        delay = 0.002 if time.monotonic() - self._last_message < POLL_IDLE_AFTER_S else POLL_IDLE_S
        while True:
            data = self._io(self._dequeue if timeout > 0 else self._dequeue_now)
            if data is not None:
                try:
                    message = self._open(data)
                except ForgedMessage as e:
                    self.rejected += 1
                    log.warning("rejected a message on %s: %s", self.name, e)
                    continue
                self._last_message = time.monotonic()
                return message
            now = time.monotonic()
            if now >= deadline:
                return None
            if not self.blocking:  # Redis blocks in BZPOPMIN; SQLite is polled with backoff
                cap = POLL_BUSY_S if now - self._last_message < POLL_IDLE_AFTER_S else POLL_IDLE_S
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, cap)

    def receive_waiting(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` verified messages that wait now, without blocking; forged ones are logged and dropped.

        One round trip on Redis (``ZPOPMIN`` with a count) however many wait: an orchestrator reading a
        thousand agents' heartbeats one round trip each spends most of its time waiting on Redis.
        """
        pop = getattr(self.storage, "conn", None)
        if self.blocking and hasattr(pop, "zpopmin"):
            items = self._io(lambda: pop.zpopmin(self.storage.queue_key, count=limit))
            raw = [data[8:] for data, _ in items]  # huey prefixes each message with its enqueue time
        else:
            raw = []
            while len(raw) < limit and (data := self._io(self._dequeue_now)) is not None:
                raw.append(data)
        out = []
        for data in raw:
            try:
                out.append(self._open(data))
            except ForgedMessage as e:
                self.rejected += 1
                log.warning("rejected a message on %s: %s", self.name, e)
        if out:
            self._last_message = time.monotonic()
        return out

    def _open(self, data: bytes) -> dict[str, Any]:
        """Verify a message and its channel binding: one signed for another channel is a replay, refused."""
        message = self.signer.open(data)
        if message.pop(CHANNEL, None) != self.name:
            raise ForgedMessage("signed for another channel (a replay)")
        return message

    def _dequeue(self):
        return self.storage.dequeue()

    def _dequeue_now(self):
        """Dequeue without blocking, even on a backend that blocks (Redis BZPOPMIN waits up to a second)."""
        if not self.blocking:
            return self.storage.dequeue()
        self.storage.blocking = False
        try:
            return self.storage.dequeue()
        finally:
            self.storage.blocking = True

    def items(self) -> list[dict[str, Any]]:
        """The verified messages now in the channel (for reconciliation), without removing them."""
        out = []
        for data in self._io(self.storage.enqueued_items):
            try:
                out.append(self._open(data))
            except ForgedMessage:
                continue
        return out

    def size(self) -> int:
        """How many messages wait."""
        return self._io(self.storage.queue_size)

    REPLY_TTL_S = 300  # an unclaimed reply (its asker gave up) expires

    def put_reply(self, key: str, message: dict[str, Any]) -> None:
        """Leave a signed reply under ``key``, bound to it: a reply moved under another key is refused."""
        self.put_replies([(key, message)])

    def put_replies(self, replies: list[tuple[str, dict[str, Any]]]) -> None:
        """``put_reply`` for several replies, in one round trip on Redis."""
        sealed = [(key, self.signer.seal({**message, REPLY_TO: key})) for key, message in replies]
        conn = getattr(self.storage, "conn", None)
        if conn is not None and hasattr(conn, "blpop"):  # Redis: a list the asker blocks on
            def put() -> None:
                pipe = conn.pipeline(transaction=False)  # sent together; no MULTI/EXEC to answer per command
                for key, data in sealed:
                    rkey = f"dlorch.reply.{self.name}.{key}"
                    pipe.rpush(rkey, data).expire(rkey, self.REPLY_TTL_S)
                pipe.execute()

            if sealed:
                self._io(put)
        else:
            for key, data in sealed:
                self._io(lambda: self._put_sqlite_reply(key, data, time.time()))

    SWEEP_EVERY_S = 60.0  # how often expired SQLite replies are looked for

    def _put_sqlite_reply(self, key: str, data: bytes, now: float) -> None:
        """A reply in huey's key-value table and its expiry in huey's schedule table (unused otherwise), together."""
        with self.storage.db(commit=True) as curs:
            curs.execute("insert or replace into kv (queue, key, value) values (?, ?, ?)",
                         (self.storage.name, f"reply:{key}", data))
            curs.execute("insert into schedule (queue, data, timestamp) values (?, ?, ?)",
                         (self.storage.name, key, now + self.REPLY_TTL_S))
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY_S
            self.sweep_replies(now)

    def sweep_replies(self, now: float) -> int:
        """Delete the SQLite replies whose time is up at ``now`` (their askers gave up); returns how many.

        Redis expires its replies itself (a TTL on each).
        """
        if not hasattr(self.storage, "db"):
            return 0

        def _do() -> int:
            with self.storage.db(commit=True) as curs:
                due = "select 'reply:' || data from schedule where queue = ? and timestamp <= ?"
                curs.execute(f"delete from kv where queue = ? and key in ({due})",
                             (self.storage.name, self.storage.name, now))
                swept = curs.rowcount
                curs.execute("delete from schedule where queue = ? and timestamp <= ?", (self.storage.name, now))
                return swept

        return self._io(_do)

    def take_reply(self, key: str, wait: float = 0.0) -> dict[str, Any] | None:
        """Pop a reply if it has arrived, waiting up to ``wait`` seconds where the backend can block."""
        from huey.constants import EmptyData

        conn = getattr(self.storage, "conn", None)
        if conn is not None and hasattr(conn, "blpop"):
            rkey = f"dlorch.reply.{self.name}.{key}"
            if wait > 0:
                got = self._io(lambda: conn.blpop([rkey], timeout=max(wait, 0.01)))
                data = got[1] if got else None
            else:
                data = self._io(lambda: conn.lpop(rkey))
        else:
            data = self._io(lambda: self.storage.pop_data(f"reply:{key}"))
        if data is EmptyData or data is None:
            return None
        try:
            reply = self.signer.open(data)
        except ForgedMessage as e:  # junk under a reply key must not end the asker: drop it, keep waiting
            self.rejected += 1
            log.warning("rejected a reply on %s: %s", self.name, e)
            return None
        if reply.pop(REPLY_TO, None) != key:
            self.rejected += 1
            log.warning("rejected a reply on %s: signed for another request (a replay)", self.name)
            return None
        return reply

    def close(self) -> None:
        """Release connections."""
        close = getattr(self.storage, "close", None)
        if close:
            close()

    def _io(self, fn):
        try:
            return fn()
        except (BadInput, ForgedMessage):
            raise
        except Exception as e:  # redis.ConnectionError, sqlite3.OperationalError, ...
            if type(e).__module__.startswith(("redis", "sqlite3")) or isinstance(e, OSError):
                raise Unreachable(f"cannot reach queue {redact(self.url)}: {redact(str(e))}; {_fix(e)}") from None
            raise


def _fix(e: Exception) -> str:
    """How to fix a queue error: a refused password or TLS certificate has its own fix; anything else, start it."""
    text = str(e)
    if type(e).__name__.startswith("Authentication") or any(k in text for k in ("WRONGPASS", "NOAUTH",
                                                                                 "invalid username-password")):
        return "the queue refused its password: fix it in --queue/DLORCH_QUEUE (rediss://:PASSWORD@host:6379/0)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ("the queue's TLS certificate was refused: connect by a host name the certificate holds, and give "
                "its CA as ?ssl_ca_certs=/path/ca.pem in --queue/DLORCH_QUEUE if no system CA signed it")
    return "start it (redis-server) or fix --queue/DLORCH_QUEUE"


class Queue:
    """The two channels a role needs, on one backend, and the envelope of the requests it sends.

    ``sender`` names who sends the requests (a node's id; a client gets ``client-<random>``). Send times
    are stamped in the orchestrator's clock as this queue knows it, ``monotonic() + offset``: the offset
    starts from this machine's wall clock and is learnt again from the ``now`` of every reply, so a wall
    clock that is hours off, or stepped meanwhile, stamps correctly after the first reply.
    """

    RESTAMPS = 3  # sends again at once of a request refused for its send time (the offset learnt meanwhile)

    def __init__(self, url: str, signer: Signer, sender: str | None = None) -> None:
        self.url = url
        self.jobs = Channel(url, "jobs", signer)
        self.events = Channel(url, "events", signer)
        self.sender = sender or f"client-{uuid.uuid4().hex[:12]}"
        self.offset = time.time() - time.monotonic()

    def stamp(self, message: dict[str, Any] | BaseModel, rid: str, oneway: bool = False) -> dict[str, Any]:
        """A request (a protocol model or its JSON) in its envelope: request id, sender, send time."""
        body = message.model_dump(mode="json", exclude_none=True) if isinstance(message, BaseModel) else message
        envelope: dict[str, Any] = {"rid": rid, "sender": self.sender, "sent_at": time.monotonic() + self.offset}
        if oneway:
            envelope["oneway"] = True
        return {**body, **envelope}

    def tell(self, message: dict[str, Any] | BaseModel) -> None:
        """Send a one-way request: no reply comes, and a lost one costs only a redo (a block report)."""
        self.events.send(self.stamp(message, uuid.uuid4().hex, oneway=True))

    def _learn(self, reply: dict[str, Any], sent: float) -> bool:
        """Take the orchestrator's clock off a reply (the offset from it); True if it asks for a new stamp."""
        now = reply.pop(NOW, None)
        if isinstance(now, (int, float)) and not isinstance(now, bool) and math.isfinite(now):
            self.offset = now - (sent + time.monotonic()) / 2  # the reply was made about midway
        return reply.pop(RESEND, None) is True

    def request(self, message: dict[str, Any] | BaseModel, timeout: float = 15.0, retry_every: float = 5.0,
                stop: Any = None) -> dict[str, Any]:
        """Send a request to the orchestrator and wait for its reply.

        The request is re-sent every ``retry_every`` seconds (handlers are idempotent), because a
        queue that restarted empty may have lost it; each copy is stamped with its own send time and
        the same request id, so the orchestrator applies it once. ``stop`` (anything with ``is_set()``)
        ends the wait early: an agent asked to stop while it waits for an orchestrator stops at once.

        Raises:
            Unreachable: no orchestrator answered within ``timeout`` (or before ``stop`` was set).
        """
        rid = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        next_send = sent = 0.0
        restamps = 0
        delay = 0.001
        blocking = self.events.blocking
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if time.monotonic() >= next_send:
                sent = time.monotonic()
                self.events.send(self.stamp(message, rid))
                next_send = sent + retry_every
            if blocking:  # Redis: block on the reply list until it lands or it is time to re-send
                reply = self.events.take_reply(rid, wait=max(0.01, min(next_send, deadline) - time.monotonic()))
            else:  # SQLite: poll, quickly at first (a reply usually takes a few milliseconds)
                reply = self.events.take_reply(rid)
                if reply is None:
                    time.sleep(delay)
                    delay = min(delay * 1.3, 0.02)
            if reply is not None:
                if self._learn(reply, sent) and restamps < self.RESTAMPS:
                    restamps, next_send = restamps + 1, 0.0  # refused for its stamp: stamp again, at once
                    continue
                return reply
        if stop is not None and stop.is_set():
            raise Unreachable(f"stopped while waiting for an orchestrator on {redact(self.url)}")
        raise Unreachable(
            f"no orchestrator answered on {redact(self.url)} within {timeout:.0f}s; start one with `dlorch up`"
        )

    def close(self) -> None:
        """Release connections."""
        self.jobs.close()
        self.events.close()
