"""Who leads the ledger: the leader record, where its process runs, and whether it still lives.

No two hosts' clocks are ever compared. A leader renews its record about once a second and adds one to
``beats`` each time; a claimant calls it gone only when the record is released, when its process is
provably dead on this very machine and pid namespace, or when the claimant has seen the same
``(id, term, beats)`` for a full lease of its own monotonic clock (``LeaderWatch``, pure: ``now`` is
passed in). Every change of leader raises ``term``, which the ledger stamps on what it writes and which
fences a deposed leader's late writes.
"""

from __future__ import annotations

import os
import socket
import uuid
from enum import Enum
from pathlib import Path

from pydantic import BaseModel


class Leader(BaseModel):
    """Who runs the orchestrator loop now; renewed like a lease."""

    id: str
    hostname: str
    pid: int
    started_at: float
    heartbeat_at: float  # the leader's own clock at its last renewal, for people to read; 0: released
    term: int = 0  # one more at each change of leader; the ledger refuses writes of an older term
    beats: int = 0  # one more at each renewal: claimants watch it advance
    boot_id: str = ""  # the machine's boot (Linux), to look the pid up only where it means this process
    pid_ns: str = ""  # the pid namespace: a container on the same host has its own pids
    pid_start: int = 0  # the process's start time (clock ticks after boot): a reused pid is another process

    @property
    def released(self) -> bool:
        """Whether its holder stepped down (the next orchestrator need not wait out its lease)."""
        return self.heartbeat_at == 0.0


def new_leader(now: float) -> Leader:
    """The record of an orchestrator in this process, about to claim leadership."""
    boot_id, pid_ns = _machine()
    return Leader(id=uuid.uuid4().hex[:12], hostname=socket.gethostname(), pid=os.getpid(), started_at=now,
                  heartbeat_at=now, boot_id=boot_id, pid_ns=pid_ns, pid_start=_start_time(os.getpid()) or 0)


class Here(str, Enum):
    """Where a recorded leader's process is, seen from this process."""

    THIS_PROCESS = "this process"  # an orchestrator of ours: alive until it releases its record
    RUNNING = "running here"  # its process still runs on this machine: its counter tells the rest
    DEAD = "dead here"  # it ran on this machine and namespace and its process is gone (or its pid reused)
    ELSEWHERE = "elsewhere"  # another machine or pid namespace: only its counter can tell


def where(leader: Leader) -> Here:
    """Where the leader's process is: pids are compared only within one boot of one machine and pid namespace."""
    boot_id, pid_ns = _machine()
    if boot_id:
        if leader.boot_id != boot_id or leader.pid_ns != pid_ns:
            return Here.ELSEWHERE
        start = _start_time(leader.pid)
        if start is None or start != leader.pid_start:
            return Here.DEAD
        return Here.THIS_PROCESS if leader.pid == os.getpid() else Here.RUNNING
    # No /proc (macOS, Windows): no containers share a hostname there; a pid is looked up where it can be.
    if leader.boot_id or leader.hostname != socket.gethostname():
        return Here.ELSEWHERE
    if leader.pid == os.getpid():
        return Here.THIS_PROCESS
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return Here.ELSEWHERE
    try:
        os.kill(leader.pid, 0)
    except ProcessLookupError:
        return Here.DEAD
    except OSError:
        pass
    return Here.RUNNING


def dead_here(leader: Leader) -> bool:
    """Whether the leader ran on this machine and namespace and its process is gone: no need to wait out a lease."""
    return where(leader) is Here.DEAD


class Verdict(str, Enum):
    """What watching the leader record tells."""

    ALIVE = "alive"  # its counter advanced while watched, or it is an orchestrator of this process
    GONE = "gone"  # no record, released, dead here, or its counter stood still for a full lease
    UNSURE = "unsure"  # watched for less than a lease and not seen to move yet


class LeaderWatch:
    """Watches the leader record's counter on the watcher's own monotonic clock."""

    def __init__(self) -> None:
        self.seen: tuple[str, int, int] | None = None
        self.since = 0.0  # when ``seen`` was first seen
        self.looked_at = 0.0
        self.verdict = Verdict.UNSURE

    def observe(self, leader: Leader | None, here: Here, now: float, lease_s: float) -> Verdict:
        """The verdict after one more look at the record (``here``: ``where(leader)``; ``now``: monotonic)."""
        if leader is None or leader.released or here is Here.DEAD:
            verdict = Verdict.GONE
        elif here is Here.THIS_PROCESS:
            verdict = Verdict.ALIVE
        else:
            key = (leader.id, leader.term, leader.beats)
            if key != self.seen:  # a renewal (or a new leader) since the last look, if that look was recent
                recent = self.seen is not None and now - self.looked_at <= lease_s
                verdict = Verdict.ALIVE if recent else Verdict.UNSURE
                self.seen, self.since = key, now
            else:
                verdict = Verdict.GONE if now - self.since >= lease_s else Verdict.UNSURE
        self.verdict, self.looked_at = verdict, now
        return verdict


def _machine() -> tuple[str, str]:
    """This machine's boot id and this process's pid namespace ("" where /proc does not tell)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot_id, os.readlink("/proc/self/ns/pid")
    except OSError:
        return "", ""


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    try:
        return int(fields[19])  # field 22 counts from the pid; after ")" the count starts at field 3
    except (IndexError, ValueError):
        return None
