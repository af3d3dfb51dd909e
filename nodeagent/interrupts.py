"""Why an agent should stop: signals, a drain request from the ledger, a lost lease."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("dlorch.agent")


class StopFlag:
    """A thread-safe flag with the first reason it was set for."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signals = 0

    def set(self, reason: str) -> None:
        """Ask for a graceful stop (checkpoint, hand back, exit)."""
        if not self._event.is_set():
            self.reason = reason
            log.info("stopping: %s", reason)
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a stop."""
        return self._event.wait(timeout)


def install_signal_handlers(flag: StopFlag) -> None:
    """SIGTERM/SIGINT (and SIGBREAK on Windows) ask for a graceful stop; a third one exits at once.

    Where signals cannot reach the agent (a Windows service, a batch system), a drain request through
    the orchestrator (``dlorch nodes drain NODE``) does the same.
    """

    def handler(signum: int, _frame: object) -> None:
        flag.signals += 1
        if flag.signals >= 3:
            raise SystemExit(128 + signum)
        flag.set(f"signal {signal.Signals(signum).name}")

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread, or not supported here
                pass


class SpotNoticePoller:
    """Polls EC2 instance metadata (IMDSv2) for a spot interruption notice and asks for a stop.

    ``GET /latest/meta-data/spot/instance-action`` answers 404 until AWS schedules the interruption
    (about two minutes ahead), then a JSON body. The base URL is a setting so that tests, or another
    cloud's metadata service shim, can feed notices; polling is off unless asked for, because probing
    the link-local metadata address off EC2 only wastes time.
    """

    def __init__(self, flag: StopFlag, base_url: str = "http://169.254.169.254", every_s: float = 5.0) -> None:
        self.flag, self.base, self.every_s = flag, base_url.rstrip("/"), every_s
        self._token: str | None = None
        self._token_at = 0.0

    def step(self, now: float) -> str | None:
        """One poll; returns the notice text (and sets the stop flag) when there is one."""
        import urllib.error
        import urllib.request

        try:
            if self._token is None or now - self._token_at > 3000:
                req = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "3600"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    self._token, self._token_at = r.read().decode(), now
            req = urllib.request.Request(f"{self.base}/latest/meta-data/spot/instance-action",
                                         headers={"X-aws-ec2-metadata-token": self._token})
            with urllib.request.urlopen(req, timeout=2) as r:
                notice = r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 401:
                self._token = None  # expired token: fetch a new one next time
            return None
        except OSError as e:
            log.debug("spot metadata poll failed: %s", e)
            return None
        self.flag.set(f"spot interruption notice {notice}")
        return notice

    def run(self, done: threading.Event) -> None:
        """Poll until ``done`` is set or a notice arrived."""
        import time

        while not done.wait(self.every_s):
            if self.step(time.time()) is not None:
                return
