"""Lease and requeue policy: pure functions of ledger state and ``now`` (no IO, no clock)."""

from __future__ import annotations

from dataclasses import dataclass

from dlorch.core.spec import AttemptOutcome, Job, JobStatus


@dataclass(frozen=True)
class Expired:
    """A running attempt whose lease ran out."""

    job_id: str
    token: int
    node: str | None


def expired_leases(jobs: list[Job], now: float, grace_until: float = 0.0) -> list[Expired]:
    """Running attempts whose lease ended before ``now``.

    ``grace_until`` lets a freshly started orchestrator honour leases it could not renew while it was
    down: nothing expires before it.
    """
    if now < grace_until:
        return []
    out = []
    for job in jobs:
        att = job.current
        if job.status is JobStatus.RUNNING and att and att.lease_expires_at is not None:
            if att.lease_expires_at < now:
                out.append(Expired(job.id, att.token, att.node))
    return out


def fruitless_attempts(job: Job) -> int:
    """Consecutive latest attempts that ended in error or a lost lease without finishing an epoch.

    A job fails once this reaches its attempt limit: a job that keeps crashing stops looping,
    while one whose nodes are merely pre-empted after making progress keeps going.
    """
    n = 0
    for att in reversed(job.attempts):
        if att.outcome in (AttemptOutcome.ERRORED, AttemptOutcome.EXPIRED) and att.epochs_done <= att.epochs_start:
            n += 1
        elif att.outcome is AttemptOutcome.RUNNING:
            continue
        else:
            break
    return n


def missing_from_queue(
    queued: list[Job], messages: list[dict], last_enqueued: dict[str, float], now: float, min_age: float
) -> list[Job]:
    """Queued jobs whose dispatch message is not in the queue (the queue lost it, or never had it).

    A job enqueued less than ``min_age`` ago is left alone: an agent may have just taken its message
    and be about to claim it.
    """
    present = {(m.get("job"), m.get("token")) for m in messages}
    out = []
    for job in queued:
        if (job.id, job.next_token) in present:
            continue
        if now - last_enqueued.get(job.id, float("-inf")) < min_age:
            continue
        out.append(job)
    return out
