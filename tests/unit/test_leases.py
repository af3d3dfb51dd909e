"""Pure lease and requeue policy, driven with a simulated clock: no server, no sleep."""

from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobStatus, parse_spec
from dlorch.orchestrator.leases import (AfterAttempt, Next, after_attempt, expired_leases, fruitless_attempts,
                                        missing_from_queue)


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


def _ended(*outcomes, error="RuntimeError: boom", max_attempts=None):
    """A job whose attempts ended, in order, with ``outcomes`` and no progress (errors say ``error``)."""
    spec = {"kind": "train", "image": "i", "labels": "l", **({"max_attempts": max_attempts} if max_attempts else {})}
    j = Job(id="j-1", spec=parse_spec(spec), created_at=0, updated_at=0, status=JobStatus.RUNNING)
    j.attempts = [Attempt(token=i + 1, outcome=o, epochs_start=2, epochs_done=2,
                          error=error if o is AttemptOutcome.ERRORED else None) for i, o in enumerate(outcomes)]
    return j


def _decide(job, permanent=False):
    return after_attempt(job, job.current.outcome, max_attempts=3, max_node_losses=4, permanent=permanent)


def test_a_success_ends_the_job_whatever_came_before():
    job = _ended(AttemptOutcome.ERRORED, AttemptOutcome.ERRORED, AttemptOutcome.SUCCEEDED)
    assert _decide(job) == AfterAttempt(Next.SUCCEED)
    assert _decide(job, permanent=True) == AfterAttempt(Next.SUCCEED)


def test_errors_requeue_under_the_limit_and_fail_at_it_with_the_error():
    E = AttemptOutcome.ERRORED
    assert _decide(_ended(E, E)) == AfterAttempt(Next.REQUEUE)
    assert _decide(_ended(E, E, E)) == AfterAttempt(Next.FAIL, "RuntimeError: boom")
    assert _decide(_ended(E, max_attempts=1)) == AfterAttempt(Next.FAIL, "RuntimeError: boom")  # the job's own limit
    assert _decide(_ended(E, E, E, E, max_attempts=5)) == AfterAttempt(Next.REQUEUE)


def test_progress_resets_the_count():
    job = _ended(AttemptOutcome.ERRORED, AttemptOutcome.ERRORED, AttemptOutcome.ERRORED)
    job.attempts[1].epochs_done = 3  # the second attempt trained an epoch: only the third counts
    assert _decide(job) == AfterAttempt(Next.REQUEUE)


def test_lost_nodes_fail_the_job_only_at_their_own_limit_and_say_how_many():
    X = AttemptOutcome.EXPIRED
    assert _decide(_ended(X, X, X)) == AfterAttempt(Next.REQUEUE)  # 3 losses: more than max_attempts, under 4
    lost = "4 nodes in a row were lost running it without progress"
    assert _decide(_ended(X, X, X, X)) == AfterAttempt(Next.FAIL, lost)


def test_a_permanent_error_fails_at_once_and_a_hand_back_requeues():
    assert _decide(_ended(AttemptOutcome.ERRORED, error="no such model"), permanent=True) == AfterAttempt(
        Next.FAIL, "no such model")
    assert _decide(_ended(AttemptOutcome.HANDED_BACK)) == AfterAttempt(Next.REQUEUE)


def test_missing_from_queue_respects_min_age():
    a, b = _job(JobStatus.QUEUED, jid="a", token=2), _job(JobStatus.QUEUED, jid="b", token=1)
    msgs = [{"job": "a", "token": 1}]  # a stale token does not count as present
    got = missing_from_queue([a, b], msgs, {"b": 95.0}, now=100.0, min_age=10)
    assert [j.id for j in got] == ["a"]
