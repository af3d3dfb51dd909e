"""Faults at the provider seam: refused launches, spot interruptions, throttling, agents that never register.

``FaultyProvider`` wraps any provider (local, EC2, Slurm) and, by the rules it is given, refuses calls with
the errors a cloud answers (``CapacityError`` for a type, zone or market; ``QuotaError``; ``ThrottledError``),
interrupts instances behind the controller's back as a spot reclaim does, and marks launches whose agent
never registers. Everything else is the inner provider's real work, so a scenario test or a simulation runs
the real launch, list and terminate calls with the faults a real cloud produces only at its own whim.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from dlorch.orchestrator.fleet.model import (
    CapacityError,
    Instance,
    LaunchRequest,
    Market,
    Provider,
    ProviderError,
    QuotaError,
    ThrottledError,
)

ERRORS: dict[str, type[ProviderError]] = {"capacity": CapacityError, "quota": QuotaError, "throttled": ThrottledError}


@dataclass
class Fault:
    """A rule: refuse matching calls with ``error`` (``"capacity"``, ``"quota"`` or ``"throttled"``).

    ``type``, ``zone`` and ``market`` narrow which launches it refuses (None: any); ``calls`` names the
    provider calls it applies to (throttling hits ``list`` and ``terminate`` too); ``times`` bounds how many
    calls it refuses (None: until removed); ``probability`` refuses only that share of the matching calls.
    """

    error: str
    type: str | None = None
    zone: str | None = None
    market: Market | None = None
    calls: tuple[str, ...] = ("launch",)
    times: int | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        if self.error not in ERRORS:
            raise ValueError(f"fault error {self.error!r}: use one of {', '.join(ERRORS)}")

    def matches(self, call: str, request: LaunchRequest | None) -> bool:
        if call not in self.calls or self.times == 0:
            return False
        if request is None:
            return self.type is None and self.zone is None and self.market is None
        return ((self.type is None or self.type == request.type)
                and (self.zone is None or self.zone == request.zone)
                and (self.market is None or self.market == request.market))


@dataclass(frozen=True)
class Injected:
    """One fault that happened, for the record (tests assert on these, simulations count them)."""

    kind: str  # "capacity", "quota", "throttled", "interrupted", "never-registers"
    call: str
    at: float
    type: str | None = None
    zone: str | None = None
    market: Market | None = None
    node_id: str | None = None
    instance_id: str | None = None


class SpotNotices:
    """A stand-in for EC2's instance metadata service that serves spot interruption notices to real agents.

    Each node polls its own base URL, ``url_for(node_id)`` (``dlorch agent --spot-notices URL``), as an
    agent on EC2 polls ``http://169.254.169.254``: ``PUT /latest/api/token`` gives a token, and
    ``GET /latest/meta-data/spot/instance-action`` answers 404 until ``notify(node_id)``, then the notice.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        notices: dict[str, str] = {}
        self.notices = notices

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                node, _, rest = self.path.lstrip("/").partition("/")
                if rest == "latest/api/token":
                    self._answer(200, f"token-{node}")
                else:
                    self._answer(404)

            def do_GET(self) -> None:  # noqa: N802
                node, _, rest = self.path.lstrip("/").partition("/")
                if self.headers.get("X-aws-ec2-metadata-token") != f"token-{node}":
                    self._answer(401)
                elif rest == "latest/meta-data/spot/instance-action" and node in notices:
                    self._answer(200, notices[node])
                else:
                    self._answer(404)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="spot-notices", daemon=True).start()

    def url_for(self, node_id: str) -> str:
        """The metadata base URL node ``node_id`` polls."""
        return f"{self.url}/{node_id}"

    def notify(self, node_id: str, at: float | None = None) -> None:
        """Post a termination notice for ``node_id`` (EC2's JSON: action and time)."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at if at is not None else time.time() + 120))
        self.notices[node_id] = json.dumps({"action": "terminate", "time": when})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FaultyProvider:
    """``inner`` with faults injected at its seam.

    Args:
        inner: the real provider.
        faults: refusal rules, tried in order (``add`` appends more).
        never_register: node ids, or a predicate on the launch request, whose agent never registers.
            The instance is launched for real (it bills and is listed), but its agent never comes up: a
            local agent is stopped (SIGSTOP) before it can register; for other providers the stand-in
            that boots agents asks ``registers(node_id)``.
        seed: the random draws of ``probability`` rules.
        clock: the time written to the record (a simulation's clock).
        notices: where interrupted nodes' agents find their spot notice (agents started with
            ``--spot-notices notices.url_for(node_id)``).
    """

    def __init__(self, inner: Provider, faults: list[Fault] | None = None,
                 never_register: set[str] | Callable[[LaunchRequest], bool] | None = None,
                 seed: int = 0, clock: Callable[[], float] = time.time, notices: SpotNotices | None = None) -> None:
        self.inner, self.name, self.notices = inner, inner.name, notices
        self.faults = list(faults or [])
        self._never = never_register if never_register is not None else set()
        self.silent: set[str] = set()  # node ids whose agent will never register
        self.injected: list[Injected] = []
        self.interrupted: set[str] = set()  # instance ids ended by an injected interruption
        self.on_interrupt: list[Callable[[Instance], None]] = []  # told before the instance goes
        self._rng, self.clock = random.Random(seed), clock
        self._lock = threading.Lock()

    # -- configuring faults --------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        """Refuse calls by one more rule; returns it (so that a test can ``remove`` it)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)

    def clear(self) -> None:
        """No more refusals (interruptions already done stay done)."""
        with self._lock:
            self.faults.clear()

    def registers(self, node_id: str) -> bool:
        """Whether the agent launched for ``node_id`` may register (False for a never-registering launch)."""
        return node_id not in self.silent

    def count(self, kind: str) -> int:
        """How many faults of ``kind`` were injected so far."""
        return sum(1 for i in self.injected if i.kind == kind)

    # -- the Provider seam ---------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        self._refuse("launch", request)
        instance = self.inner.launch(request)
        never = self._never(request) if callable(self._never) else request.node_id in self._never
        if never:
            with self._lock:
                self.silent.add(request.node_id)
                self.injected.append(Injected("never-registers", "launch", self.clock(), request.type, request.zone,
                                              request.market, request.node_id, instance.id))
            self._silence(instance)
        return instance

    def terminate(self, instance_ids: list[str]) -> None:
        self._refuse("terminate", None)
        self.inner.terminate(instance_ids)

    def list(self) -> list[Instance]:
        self._refuse("list", None)
        return self.inner.list()

    def ended(self, instance_ids: list[str]) -> dict[str, float]:
        """The inner provider's end times (none where it cannot date them)."""
        ended = getattr(self.inner, "ended", None)
        if ended is None:
            return {}
        self._refuse("list", None)
        return ended(instance_ids)

    # -- interruptions -------------------------------------------------------------------------------------

    def interrupt(self, instance_id: str, notice_s: float = 0.0) -> Instance:
        """Reclaim an instance behind the controller's back, as EC2 ends a spot instance.

        The ``on_interrupt`` callbacks hear of it first (a stand-in agent hands its job back, as a real
        one does on the two-minute notice), and ``notices`` (a ``SpotNotices``) posts the notice real agents
        poll for; then, ``notice_s`` seconds later, the inner provider terminates it: a local agent gets
        SIGTERM, which it answers with the same hand-back.

        Raises:
            ProviderError: the instance is not one of the inner provider's live instances.
        """
        found = [i for i in self.inner.list() if i.id == instance_id]
        if not found:
            raise ProviderError(f"cannot interrupt {instance_id}: no such live instance")
        instance = found[0]
        with self._lock:
            self.interrupted.add(instance_id)
            self.injected.append(Injected("interrupted", "interrupt", self.clock(), instance.type, instance.zone,
                                          instance.market, instance.node_id, instance_id))
        for callback in list(self.on_interrupt):
            callback(instance)
        if self.notices is not None and instance.node_id:
            self.notices.notify(instance.node_id, at=time.time() + notice_s)
        if notice_s > 0:
            timer = threading.Timer(notice_s, self.inner.terminate, args=([instance_id],))
            timer.daemon = True
            timer.start()
        else:
            self.inner.terminate([instance_id])
        return instance

    # -- helpers -------------------------------------------------------------------------------------------

    def _refuse(self, call: str, request: LaunchRequest | None) -> None:
        with self._lock:
            for fault in self.faults:
                if not fault.matches(call, request):
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                self.injected.append(Injected(fault.error, call, self.clock(),
                                              request.type if request else None, request.zone if request else None,
                                              request.market if request else None,
                                              request.node_id if request else None))
                what = f"{request.type} ({request.market.value}) in {request.zone or 'any zone'}" if request else call
                raise ERRORS[fault.error](f"injected {fault.error} fault: {call} of {what} refused")

    def _silence(self, instance: Instance) -> None:
        """Keep a launched local agent from registering: stop its process before it gets that far."""
        if self.inner.name == "local" and instance.id.startswith("local-") and instance.id[6:].isdigit():
            try:
                os.kill(int(instance.id[6:]), signal.SIGSTOP)
            except OSError:
                pass
