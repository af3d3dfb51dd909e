"""Lease and requeue policy: pure functions of ledger state and ``now`` (no IO, no clock)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

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


class Next(str, Enum):
    """What becomes of a job once one of its attempts has ended."""

    SUCCEED = "succeed"  # the attempt produced the job's result: the job is done
    REQUEUE = "requeue"  # queued again: the next attempt resumes from the latest checkpoint
    FAIL = "fail"  # given up: the error says why


@dataclass(frozen=True)
class AfterAttempt:
    """The decision on a job whose attempt ended, with the job's error when it fails."""

    next: Next
    error: str | None = None


def after_attempt(job: Job, outcome: AttemptOutcome, *, max_attempts: int, max_node_losses: int,
                  permanent: bool = False) -> AfterAttempt:
    """Succeed, requeue or fail a job whose current attempt has just ended with ``outcome``.

    Args:
        job: the job with the ended attempt already recorded (outcome, epochs, error).
        outcome: how the attempt ended (not RUNNING or SPLIT).
        max_attempts: errors in a row without progress before the job fails; the job's own
            ``spec.max_attempts`` takes precedence.
        max_node_losses: lost nodes in a row without progress before the job fails.
        permanent: the node reported an error that no retry can cure (e.g. an unreadable input).

    Returns:
        SUCCEED, REQUEUE, or FAIL with the error the job is failed with: the attempt's own error,
        or, when nodes were lost, how many.
    """
    if outcome is AttemptOutcome.SUCCEEDED:
        return AfterAttempt(Next.SUCCEED)
    errors, losses = fruitless_attempts(job)
    if permanent or errors >= (job.spec.max_attempts or max_attempts) or losses >= max_node_losses:
        att = job.current
        error = att.error if att else None
        return AfterAttempt(Next.FAIL, error or f"{losses} nodes in a row were lost running it without progress")
    return AfterAttempt(Next.REQUEUE)


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


def owned_by(uri: str, prefix: str) -> bool:
    """Whether ``uri`` names something under ``prefix`` (an attempt's own keys): fencing of what it reports.

    Both are parsed: the scheme and host must be the prefix's, and the path must lie below the prefix's
    path. A path with ``.`` or ``..`` segments, a query or a fragment is under nothing (an agent's store
    never makes one), so ``s3://other/jobs/J/attempts/2/x`` and ``.../attempts/2/../../K/x`` are refused.
    """
    if os.name == "nt":  # a Windows path's separators, so that it parses as the store's
        uri, prefix = uri.replace("\\", "/"), prefix.replace("\\", "/")
    u, p = urlsplit(uri), urlsplit(prefix)
    if (u.scheme.lower(), u.netloc) != (p.scheme.lower(), p.netloc) or u.query or u.fragment or "#" in uri:
        return False
    if any(part in (".", "..") for part in u.path.split("/")):
        return False
    base = posixpath.normpath(p.path)
    return posixpath.normpath(u.path).startswith(base.rstrip("/") + "/")
