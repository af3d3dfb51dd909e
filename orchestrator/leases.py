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


def fruitless_attempts(job: Job) -> tuple[int, int]:
    """(errors, node losses) among the latest run of attempts that ended without finishing an epoch.

    A job fails once either count reaches its limit: a job that keeps raising stops looping after a
    few tries, and one whose nodes keep vanishing (a crash that kills the agent, or out of memory)
    after more, since pre-emptions of healthy jobs look the same and must not fail them early.
    """
    errors = losses = 0
    for att in reversed(job.attempts):
        if att.outcome is AttemptOutcome.RUNNING:
            continue
        if att.outcome not in (AttemptOutcome.ERRORED, AttemptOutcome.EXPIRED) or att.epochs_done > att.epochs_start:
            break
        if att.outcome is AttemptOutcome.ERRORED:
            errors += 1
        else:
            losses += 1
    return errors, losses


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
