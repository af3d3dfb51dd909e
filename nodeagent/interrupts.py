"""Why an agent should stop: signals, a drain request from the ledger, a lost lease, the end of its parent."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("dlorch.agent")


class StopFlag:
    """A thread-safe flag with the first reason it was set for."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signals = 0
        self.set_at: float | None = None  # monotonic time of the first stop request

    def set(self, reason: str) -> None:
        """Ask for a graceful stop (checkpoint, hand back, exit)."""
        if not self._event.is_set():
            self.reason, self.set_at = reason, time.monotonic()
            log.info("stopping: %s", reason)
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a stop."""
        return self._event.wait(timeout)

    def bounded(self, grace_s: float) -> "WaitBound":
        """The stop for one wait for the orchestrator, which a stop ends after ``grace_s`` (see ``WaitBound``)."""
        return WaitBound(self, grace_s)


class WaitBound:
    """Set ``grace_s`` after a stop was asked, or after the wait began if the stop came first.

    A stopping agent still sends its hand-back and gives it a moment to be recorded, but no wait for an
    orchestrator that is gone (a killed command's embedded one, say) keeps it alive longer than that.
    """

    def __init__(self, flag: StopFlag, grace_s: float) -> None:
        self.flag, self.grace_s, self.began = flag, grace_s, time.monotonic()

    def is_set(self) -> bool:
        """Whether the wait should end now."""
        at = self.flag.set_at
        return at is not None and time.monotonic() - max(at, self.began) >= self.grace_s


PARENT_GONE = "the command that started this agent has ended"


def stop_with_parent(flag: StopFlag, parent_pid: int, every_s: float = 1.0) -> None:
    """Ask for a stop when process ``parent_pid``, which started this agent, ends (even by SIGKILL).

    On Linux the kernel sends this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which the
    signal handlers turn into a stop; a watch thread also looks every ``every_s`` whether the parent is
    still this process's parent (macOS and other POSIX systems; there a parent's end re-parents us).
    """
    if os.getppid() == parent_pid:
        _signal_at_parent_death(signal.SIGTERM)
    if os.getppid() != parent_pid:  # it has ended (perhaps before the kernel was told)
        flag.set(PARENT_GONE)
        return

    def watch() -> None:
        while not flag.wait(every_s):
            if os.getppid() != parent_pid:
                flag.set(PARENT_GONE)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _signal_at_parent_death(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)`` on Linux; elsewhere nothing (the watch thread does the work)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); the parent watch remains", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        log.warning("prctl unavailable (%s); the parent watch remains", e)


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
