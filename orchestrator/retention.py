"""Retention: which stored artifacts of jobs may be deleted, a pure function of the jobs, the stored keys and now.

What resume and ``predict`` need is kept:

* a job that may still run (queued, running, waiting) keeps its accepted checkpoints (``Job.checkpoint``
  and ``Job.checkpoints``, the ones a corrupt newest one falls back to), and every checkpoint its
  running attempt wrote from the oldest of those on (a newer one may be on its way to being accepted);
* every job keeps its final model (``Job.model``: ``dlorch predict JOB`` loads it) and its output,
  the attempts' logs, and anything else this policy does not name.

What goes: checkpoints superseded by newer accepted ones; every checkpoint of a job that ended
(succeeded, failed or cancelled: it never runs again); models and outputs of attempts that ended
without them being accepted (a fenced or failed attempt). ``older_than_s`` spares the jobs that
ended more recently than that.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from dlorch.core.spec import Attempt, AttemptOutcome, Job

# The attempt-scoped keys an agent writes (nodeagent/attempt.py); any other key is kept.
ARTIFACT = re.compile(r"jobs/(?P<job>[^/]+)/attempts/(?P<token>\d+)/"
                      r"(?:ckpt/epoch-(?P<epoch>\d+)\.ckpt|(?P<result>model\.ckpt|output\.[a-z]+))$")


class Deletion(NamedTuple):
    """A store key that may be deleted, and why."""

    key: str
    why: str


def deletions(jobs: Iterable[Job], keys: Iterable[str], store_url: str, now: float,
              older_than_s: float = 0.0) -> list[Deletion]:
    """The keys (relative to the store at ``store_url``) that no resume or prediction needs, sorted.

    Args:
        jobs: the ledger's jobs; a key of a job not among them is kept.
        keys: the store keys found under the jobs' attempts.
        store_url: the store's URL, which the jobs' artifact URIs begin with.
        now: the time the decision is for (seconds since the epoch).
        older_than_s: a job that ended less than this long ago loses nothing.
    """
    by_id = {j.id: j for j in jobs}
    out = []
    for key in keys:
        m = ARTIFACT.match(key)
        job = by_id.get(m["job"]) if m else None
        if job is None:
            continue
        why = _why(job, m, f"{store_url}/{key}", now, older_than_s)
        if why is not None:
            out.append(Deletion(key, why))
    return sorted(out)


def _why(job: Job, m: re.Match, uri: str, now: float, older_than_s: float) -> str | None:
    """Why the artifact ``uri`` of ``job`` may go, or None to keep it."""
    if uri in (job.model, job.output):
        return None
    ended = job.status.is_terminal()
    if ended and now - job.updated_at < older_than_s:
        return None
    attempt = _attempt(job, int(m["token"]))
    if attempt is None or attempt.outcome is AttemptOutcome.RUNNING and not ended:
        return None if m["result"] else _superseded(job, uri, int(m["epoch"]))
    if m["result"]:
        return f"a result of attempt {attempt.token} ({attempt.outcome.value}) that the job never took"
    if ended:
        return f"a checkpoint of a job {job.status.value}, which never runs again"
    if uri in _accepted(job):
        return None
    return "a checkpoint superseded by newer accepted ones"


def _superseded(job: Job, uri: str, epoch: int) -> str | None:
    """A running attempt's checkpoint goes only if older than every accepted one (it can never be accepted)."""
    epochs = [e for e, _ in job.checkpoints]
    if uri in _accepted(job) or not epochs or epoch >= min(epochs):
        return None
    return "a checkpoint superseded by newer accepted ones"


def _accepted(job: Job) -> set[str]:
    return {u for _, u in job.checkpoints} | ({job.checkpoint} if job.checkpoint else set())


def _attempt(job: Job, token: int) -> Attempt | None:
    return next((a for a in job.attempts if a.token == token), None)
