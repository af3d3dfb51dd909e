"""The orchestrator's request handling: claims, fencing, hand-back, retries, cancel (simulated clock)."""

import pytest

from dlorch.core.spec import AttemptOutcome, JobStatus
from dlorch.orchestrator.service import NotLeader, Orchestrator


def _submit(o, **kw):
    spec = {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy", **kw}
    return o.handle({"type": "submit", "spec": spec})["job"]


def _register(o, node):
    o.handle({"type": "register", "node_info": {"id": node, "hostname": "h", "pid": 1, "cpus": 2,
                                                  "memory_bytes": 1, "gpus": [], "torch": "x"}})


def _take(o, node):
    msg = o.queue.jobs.receive(timeout=0.5)
    return msg, o.handle({"type": "claim", "job": msg["job"], "token": msg["token"], "node": node})


def test_claim_progress_finish(orch, tmp_path):
    _register(orch, "n1")
    jid = _submit(orch, epochs=4)
    msg, reply = _take(orch, "n1")
    assert reply["ok"] and msg == {"job": jid, "token": 1, "kind": "train"}
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00001.ckpt"
    assert orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 1,
                        "checkpoint": ck})["ok"]
    done = orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "succeeded",
                        "epochs_done": 4, "model": f"{tmp_path}/jobs/{jid}/attempts/1/model.ckpt"})
    assert done == {"ok": True, "status": "succeeded"}
    job = orch.ledger.get(jid)
    assert (job.status, job.epochs_done, job.checkpoint, job.node) == (JobStatus.SUCCEEDED, 4, ck, "n1")
    orch.handle({"type": "heartbeat", "node": "n1"})  # the node's own heartbeat says it is free again
    assert orch.ledger.node("n1").job is None and orch.ledger.node("n1").state == "idle"


def test_an_epoch_count_re_fitted_by_training_grows_the_jobs_total(orch, tmp_path):
    jid = _submit(orch)  # automatic epochs: the total comes from the node's plan
    _take(orch, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-0000%d.ckpt"
    for done, total in [(1, 26), (2, 40), (3, 40)]:
        assert orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": done,
                            "epochs_total": total, "checkpoint": ck % done, "plan": {"epochs": 26}})["ok"]
    job = orch.ledger.get(jid)
    assert (job.epochs_done, job.epochs_total) == (3, 40) and job.plan == {"epochs": 26}  # the plan as first made
    orch.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": 4, "epochs_total": 26,
                 "checkpoint": ck % 4})  # a smaller total never shrinks it (re-fitting only extends)
    assert orch.ledger.get(jid).epochs_total == 40


def test_duplicate_message_is_idempotent(orch):
    jid = _submit(orch)
    orch._enqueue(orch.ledger.get(jid), orch.clock_())  # the queue now holds the same message twice
    _, first = _take(orch, "n1")
    _, second = _take(orch, "n2")
    assert first["ok"] and not second["ok"]
    assert len(orch.ledger.get(jid).attempts) == 1


def test_fencing_rejects_a_stale_attempt(orch, tmp_path):
    jid = _submit(orch, epochs=5)
    _take(orch, "old")
    orch.clock_.t += 11  # the old node stops heartbeating
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.QUEUED and job.attempts[0].outcome is AttemptOutcome.EXPIRED
    _, reply = _take(orch, "new")
    assert reply["ok"] and reply["job"]["next_token"] == 2
    stale = orch.handle({"type": "progress", "job": jid, "token": 1, "node": "old", "epochs_done": 3,
                         "checkpoint": f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00003.ckpt"})
    assert not stale["ok"] and "does not hold the lease" in stale["reason"]
    hb = orch.handle({"type": "heartbeat", "node": "old", "job": jid, "token": 1})
    assert hb["lease"] is False
    forged = orch.handle({"type": "finish", "job": jid, "token": 2, "node": "new", "outcome": "succeeded",
                          "output": f"{tmp_path}/jobs/{jid}/attempts/1/output.tif"})
    assert not forged["ok"] and "outside attempt 2" in forged["reason"]
    assert orch.ledger.get(jid).status is JobStatus.RUNNING


def test_handback_requeues_with_progress(orch, tmp_path):
    jid = _submit(orch, epochs=6)
    _take(orch, "n1")
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-00002.ckpt"
    orch.handle({"type": "finish", "job": jid, "token": 1, "node": "n1", "outcome": "handed_back",
                 "epochs_done": 2, "checkpoint": ck})
    job = orch.ledger.get(jid)
    assert (job.status, job.epochs_done, job.next_token, job.checkpoint) == (JobStatus.QUEUED, 2, 2, ck)
    _, reply = _take(orch, "n2")
    assert reply["job"]["attempts"][-1]["resumed_from"] == ck
    assert reply["job"]["attempts"][-1]["epochs_start"] == 2


def test_errors_retry_then_fail(orch):
    jid = _submit(orch)
    for token in (1, 2):
        _take(orch, "n1")
        orch.handle({"type": "finish", "job": jid, "token": token, "node": "n1", "outcome": "errored",
                     "error": "RuntimeError: boom"})
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and "boom" in job.error
    assert orch.queue.jobs.size() == 0


def test_cancel_running_job_revokes_lease(orch):
    jid = _submit(orch)
    _take(orch, "n1")
    assert orch.handle({"type": "cancel", "job": jid})["ok"]
    assert orch.handle({"type": "heartbeat", "node": "n1", "job": jid, "token": 1})["lease"] is False
    assert not orch.handle({"type": "cancel", "job": jid})["ok"]


def test_second_orchestrator_is_refused(orch, tmp_path):
    other = Orchestrator(orch.settings, orch.ledger, orch.queue, clock=orch.clock_)
    with pytest.raises(NotLeader, match="already running"):
        other.lead()


def test_queue_rebuilt_from_ledger(orch):
    jid = _submit(orch)
    orch.queue.jobs.storage.flush_queue()  # the queue lost everything
    orch.clock_.t += 6
    orch.maintain(orch.clock_())
    assert orch.queue.jobs.receive(timeout=0.5)["job"] == jid


def test_lost_nodes_fail_a_job_only_after_their_own_limit(orch):
    orch.settings.max_node_losses = 4
    jid = _submit(orch)
    for _ in range(3):
        _take(orch, "n1")
        orch.clock_.t += 11
        orch.maintain(orch.clock_())
    assert orch.ledger.get(jid).status is JobStatus.QUEUED  # 3 losses > max_attempts (2), still going
    _take(orch, "n1")
    orch.clock_.t += 11
    orch.maintain(orch.clock_())
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and "4 nodes in a row" in job.error


def _split(o, node, n_blocks):
    """Submit a blockwise prediction, claim it, and report its split into ``n_blocks`` one-slice blocks."""
    store = o.store_url
    spec = {"kind": "predict", "image": "/s/v.zarr", "model": "/s/m.ckpt", "output_format": "zarr"}
    jid = o.handle({"type": "submit", "spec": spec})["job"]
    while (msg := o.queue.jobs.receive(timeout=0.5))["kind"] == "blocks":
        pass  # dispatch messages of an earlier blockwise job
    assert o.handle({"type": "claim", "job": jid, "token": msg["token"], "node": node})["ok"]
    blocks = [{"index": i, "core": [[i, i + 1], [0, 8]], "read": [[i, i + 1], [0, 8]]} for i in range(n_blocks)]
    got = o.handle({"type": "finish", "job": jid, "token": msg["token"], "node": node, "outcome": "split",
                    "output": f"{store}/jobs/{jid}/output.zarr", "blocks": blocks, "norm": {}, "voxels": 8 * n_blocks})
    assert got == {"ok": True, "status": "waiting"}
    return jid


def test_a_block_request_carries_the_done_reports_and_the_last_goes_alone(orch):
    _register(orch, "n1")
    jid = _split(orch, "n1", 3)
    first = orch.handle({"type": "next_block", "node": "n1", "job": jid, "done": []})["block"]["index"]
    report = {"job": jid, "block": first, "timings": {"compute_s": 2.0}}
    second = orch.handle({"type": "next_block", "node": "n1", "job": jid, "after": first, "done": [report]})
    assert second["block"]["index"] != first
    assert orch.books[jid].done == {first} and orch.books[jid].timings["compute_s"] == 2.0
    # A re-sent request (no reply came back in time) counts its report once.
    orch.handle({"type": "next_block", "node": "n1", "job": jid, "after": first, "done": [report]})
    assert orch.books[jid].timings["compute_s"] == 2.0 and orch.books[jid].by_node == {"n1": 1}
    # The orchestrator's own time per block is measured, as wall time and as its CPU time.
    timings = orch.books[jid].timings
    assert timings["dispatch_s"] > 0 and 0 < timings["dispatch_cpu_s"] <= timings["dispatch_s"] * 1.5
    for index in {0, 1, 2} - {first}:
        orch.handle({"type": "block_done", "node": "n1", "job": jid, "block": index, "timings": {}})
    assert orch.ledger.get(jid).status is JobStatus.SUCCEEDED


def test_blocks_are_leased_in_memory_and_flushed_to_the_ledger(orch):
    _register(orch, "n1")
    _register(orch, "n2")
    jid = _split(orch, "n1", 3)
    tokens = [orch.queue.jobs.receive(timeout=0.1) for _ in range(4)]
    assert [t and t["kind"] for t in tokens] == ["blocks"] * 3 + [None]  # one per block (up to 64)
    a = orch.handle({"type": "next_block", "node": "n1", "job": jid})
    assert a["block"]["index"] == 0 and a["context"]["spec"]["image"] == "/s/v.zarr"
    b = orch.handle({"type": "next_block", "node": "n2", "job": jid, "have": [jid]})
    assert b["block"]["index"] == 1 and "context" not in b  # the node said it has the job's context
    orch.handle({"type": "block_done", "node": "n1", "job": jid, "block": 0, "timings": {"compute_s": 1.0}})
    # A heartbeat naming a block that is done meanwhile is no reason to stop taking the job's blocks.
    hb = orch.handle({"type": "heartbeat", "node": "n1", "blocks": [[jid, 0]]})
    assert "jobs_gone" not in hb
    assert orch.ledger.get(jid).blocks["done"] == 0  # not written yet: done marks are flushed about once a second
    orch.clock_.t += 2
    orch.maintain(orch.clock_())
    assert orch.ledger.get(jid).blocks["done_ranges"] == [[0, 1]]
    # n2 goes silent: its lease runs out and block 1 is handed out again.
    orch.clock_.t += 20
    orch.maintain(orch.clock_())
    c = orch.handle({"type": "next_block", "node": "n1", "job": jid, "after": 0})
    assert c["block"]["index"] == 1
    orch.handle({"type": "block_done", "node": "n1", "job": jid, "block": 1, "timings": {}})
    d = orch.handle({"type": "next_block", "node": "n1", "job": jid})
    orch.handle({"type": "block_done", "node": "n1", "job": jid, "block": d["block"]["index"], "timings": {}})
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.SUCCEEDED and job.blocks["by_node"] == {"n1": 3}
    assert orch.handle({"type": "next_block", "node": "n2", "job": jid}) == {"ok": True, "block": None}
    assert orch.handle({"type": "heartbeat", "node": "n2", "blocks": [[jid, 1]]})["jobs_gone"] == [jid]


def test_a_restarted_orchestrator_rebuilds_blocks_from_the_ledger(orch, tmp_path):
    _register(orch, "n1")
    jid = _split(orch, "n1", 4)
    for _ in range(2):
        got = orch.handle({"type": "next_block", "node": "n1", "job": jid})
        orch.handle({"type": "block_done", "node": "n1", "job": jid, "block": got["block"]["index"], "timings": {}})
    orch.clock_.t += 2
    orch.maintain(orch.clock_())  # flushed: blocks 0 and 1 done
    held = orch.handle({"type": "next_block", "node": "n1", "job": jid})["block"]["index"]
    # A new orchestrator on the same ledger (the old one crashed: its memory is gone).
    fresh = Orchestrator(orch.settings, orch.ledger, orch.queue, clock=orch.clock_)
    fresh.ledger.release_leadership(orch.me)
    fresh.lead()
    fresh.handle({"type": "heartbeat", "node": "n1", "blocks": [[jid, held]]})  # the holder re-adopts its block
    other = fresh.handle({"type": "next_block", "node": "n2", "job": jid})["block"]["index"]
    assert other not in (0, 1, held)
    fresh.handle({"type": "block_done", "node": "n1", "job": jid, "block": held, "timings": {}})
    fresh.handle({"type": "block_done", "node": "n2", "job": jid, "block": other, "timings": {}})
    assert fresh.ledger.get(jid).status is JobStatus.SUCCEEDED


def test_a_block_out_of_tries_fails_the_job_and_cancel_stops_handing_out(orch):
    _register(orch, "n1")
    jid = _split(orch, "n1", 3)
    for _ in range(2):  # max_attempts = 2
        got = orch.handle({"type": "next_block", "node": "n1", "job": jid})
        assert got["block"]["index"] == 0
        orch.handle({"type": "block_failed", "node": "n1", "job": jid, "block": 0, "error": "bad chunk"})
    job = orch.ledger.get(jid)
    assert job.status is JobStatus.FAILED and job.error == "block 0: bad chunk"
    assert orch.handle({"type": "next_block", "node": "n1", "job": jid})["block"] is None
    jid2 = _split(orch, "n1", 3)
    orch.handle({"type": "cancel", "job": jid2})
    assert orch.handle({"type": "next_block", "node": "n1", "job": jid2})["block"] is None


def test_a_more_urgent_queued_job_sends_block_workers_back_to_the_queue(orch):
    _register(orch, "n1")
    jid = _split(orch, "n1", 4)
    assert orch.handle({"type": "next_block", "node": "n1", "job": jid})["block"]["index"] == 0
    urgent = _submit(orch, epochs=1, priority=5)
    assert orch.handle({"type": "next_block", "node": "n1", "job": jid})["block"] is None
    while (msg := orch.queue.jobs.receive(timeout=0.5))["job"] != urgent:
        pass
    assert orch.handle({"type": "claim", "job": urgent, "token": msg["token"], "node": "n1"})["ok"]
    assert orch.handle({"type": "next_block", "node": "n2", "job": jid})["block"]["index"] == 1
