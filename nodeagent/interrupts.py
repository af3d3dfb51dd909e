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
