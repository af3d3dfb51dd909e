"""Retention policy: what may be deleted keeps every checkpoint a resume needs and every model and output."""

from dlorch.core.spec import Attempt, AttemptOutcome, Job, JobSpec, JobStatus
from dlorch.orchestrator.retention import deletions

STORE = "s3://bucket/dlorch"
NOW = 1_000_000.0


def _ckpt(job: str, token: int, epoch: int) -> str:
    return f"jobs/{job}/attempts/{token}/ckpt/epoch-{epoch:05d}.ckpt"


def _job(jid: str, status: JobStatus, attempts: list[tuple[int, AttemptOutcome]], kept: list[tuple[int, str]],
         updated_at: float = NOW - 10, **fields) -> Job:
    spec = JobSpec(kind="train", image=f"{STORE}/blobs/a.npy", labels=f"{STORE}/blobs/b.npy")
    return Job(id=jid, spec=spec, status=status, created_at=0.0, updated_at=updated_at,
               attempts=[Attempt(token=t, outcome=o) for t, o in attempts],
               checkpoints=[(e, f"{STORE}/{k}") for e, k in kept],
               checkpoint=f"{STORE}/{kept[-1][1]}" if kept else None, **fields)


def test_a_running_job_keeps_its_accepted_checkpoints_and_any_its_attempt_may_still_report():
    kept = [(e, _ckpt("j-1", 2, e)) for e in range(4, 9)]  # the last five accepted, from attempt 2
    job = _job("j-1", JobStatus.RUNNING, [(1, AttemptOutcome.EXPIRED), (2, AttemptOutcome.RUNNING)], kept)
    keys = [_ckpt("j-1", 1, e) for e in (1, 2, 3)] + [_ckpt("j-1", 2, e) for e in range(3, 10)]
    keys += ["jobs/j-1/attempts/1/log.txt", "jobs/j-1/attempts/1/model.ckpt"]
    gone = {d.key: d.why for d in deletions([job], keys, STORE, NOW)}
    assert set(gone) == {_ckpt("j-1", 1, 1), _ckpt("j-1", 1, 2), _ckpt("j-1", 1, 3), _ckpt("j-1", 2, 3),
                         "jobs/j-1/attempts/1/model.ckpt"}
    assert _ckpt("j-1", 2, 9) not in gone  # written, its progress report maybe on its way: kept
    assert "superseded" in gone[_ckpt("j-1", 1, 1)] and "never took" in gone["jobs/j-1/attempts/1/model.ckpt"]


def test_a_queued_job_keeps_what_it_resumes_from_including_the_fallbacks():
    kept = [(2, _ckpt("j-1", 1, 2)), (3, _ckpt("j-1", 2, 3))]
    job = _job("j-1", JobStatus.QUEUED, [(1, AttemptOutcome.HANDED_BACK), (2, AttemptOutcome.EXPIRED)], kept)
    keys = [_ckpt("j-1", 1, 1), _ckpt("j-1", 1, 2), _ckpt("j-1", 2, 3), _ckpt("j-1", 2, 4)]
    assert [d.key for d in deletions([job], keys, STORE, NOW)] == [_ckpt("j-1", 1, 1), _ckpt("j-1", 2, 4)]


def test_an_ended_job_keeps_its_model_and_output_and_logs_only():
    model, output = "jobs/j-1/attempts/2/model.ckpt", "jobs/j-1/attempts/2/output.tif"
    job = _job("j-1", JobStatus.SUCCEEDED, [(1, AttemptOutcome.EXPIRED), (2, AttemptOutcome.SUCCEEDED)],
               [(5, _ckpt("j-1", 2, 5))], model=f"{STORE}/{model}", output=f"{STORE}/{output}")
    keys = [_ckpt("j-1", 2, 5), _ckpt("j-1", 1, 1), model, output, "jobs/j-1/attempts/1/output.tif",
            "jobs/j-1/attempts/2/log.txt", "jobs/j-1/output.zarr", "jobs/j-1/attempts/2/output.zarr/c/0"]
    assert [d.key for d in deletions([job], keys, STORE, NOW)] == [
        _ckpt("j-1", 1, 1), "jobs/j-1/attempts/1/output.tif", _ckpt("j-1", 2, 5)]
    assert deletions([job], keys, STORE, NOW, older_than_s=3600) == []  # it ended 10 s ago


def test_keys_of_unknown_jobs_or_shapes_are_kept():
    job = _job("j-1", JobStatus.FAILED, [(1, AttemptOutcome.ERRORED)], [])
    keys = [_ckpt("j-2", 1, 1), "jobs/j-1/attempts/1/notes.txt", "jobs/j-1/attempts/x/ckpt/epoch-00001.ckpt",
            "blobs/abc.npy"]
    assert deletions([job], keys, STORE, NOW) == []
