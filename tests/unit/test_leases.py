"""Pure lease and requeue policy, driven with a simulated clock."""

from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobStatus, parse_spec
from dlorch.orchestrator.leases import expired_leases, fruitless_attempts, missing_from_queue


def _job(status=JobStatus.RUNNING, expires=100.0, jid="j-1", token=1):
    j = Job(id=jid, spec=parse_spec({"kind": "train", "image": "i", "labels": "l"}), created_at=0, updated_at=0,
            status=status, next_token=token)
    if status is JobStatus.RUNNING:
        j.attempts.append(Attempt(token=token, node="n1", lease_expires_at=expires))
    return j


def test_expiry_and_grace():
    jobs = [_job(expires=100), _job(expires=200, jid="j-2")]
    assert [e.job_id for e in expired_leases(jobs, now=150)] == ["j-1"]
    assert expired_leases(jobs, now=150, grace_until=160) == []
    assert expired_leases(jobs, now=99) == []


def test_fruitless_counts_only_attempts_without_progress():
    j = _job()
    j.attempts = [Attempt(token=1, outcome=AttemptOutcome.EXPIRED, epochs_start=0, epochs_done=3),
                  Attempt(token=2, outcome=AttemptOutcome.ERRORED, epochs_start=3, epochs_done=3),
                  Attempt(token=3, outcome=AttemptOutcome.EXPIRED, epochs_start=3, epochs_done=3)]
    assert fruitless_attempts(j) == (1, 1)


def test_missing_from_queue_respects_min_age():
    a, b = _job(JobStatus.QUEUED, jid="a", token=2), _job(JobStatus.QUEUED, jid="b", token=1)
    msgs = [{"job": "a", "token": 1}]  # a stale token does not count as present
    got = missing_from_queue([a, b], msgs, {"b": 95.0}, now=100.0, min_age=10)
    assert [j.id for j in got] == ["a"]
