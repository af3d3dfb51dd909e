"""What the dashboard reads: per-epoch curves recorded from progress reports, the queue in dispatch order,
job rows, nodes with the orchestrator's newest heartbeats; and its API (TestClient, in-process orchestrator)."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi.testclient import TestClient

from dlorch.core.spec import CURVE_POINTS, Job, JobSpec, JobStatus
from dlorch.orchestrator.web.dashboard import create_app
from dlorch.orchestrator.web.overview import Overview, job_row


def _submit(o, **kw):
    spec = {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy", **kw}
    return o.handle({"type": "submit", "spec": spec})["job"]


def _register(o, node, gpus=()):
    o.handle({"type": "register", "node_info": {"id": node, "hostname": "h", "pid": 1, "cpus": 2,
                                                  "memory_bytes": 2**33, "gpus": list(gpus), "torch": "x"}})


def _progress(o, jid, done, tmp_path, **metrics):
    ck = f"{tmp_path}/jobs/{jid}/attempts/1/ckpt/epoch-{done:05d}.ckpt"
    return o.handle({"type": "progress", "job": jid, "token": 1, "node": "n1", "epochs_done": done,
                     "epochs_total": 10, "checkpoint": ck, "metrics": metrics})


def test_progress_reports_build_the_jobs_curve(orch, tmp_path):
    jid = _submit(orch, epochs=10)
    msg = orch.queue.jobs.receive(timeout=0.5)
    assert orch.handle({"type": "claim", "job": jid, "token": msg["token"], "node": "n1"})["ok"]
    for e in (1, 2, 3):
        assert _progress(orch, jid, e, tmp_path, train_loss=1.0 / e, val_iou=e / 4, lr=0.01)["ok"]
    _progress(orch, jid, 2, tmp_path, train_loss=9.0)  # a late copy of an older report changes nothing
    curve = orch.ledger.get(jid).curve
    assert [p["epoch"] for p in curve] == [1, 2, 3] and curve[2] == {"epoch": 3, "train_loss": 1 / 3, "val_iou": 0.75}


def test_a_curve_stays_bounded_and_keeps_its_span():
    job = Job(id="j-1", spec=JobSpec(kind="train", image="i", labels="l"), created_at=0, updated_at=0)
    for e in range(1, 1001):
        job.record_epoch(e, {"train_loss": 1.0 / e})
    epochs = [p["epoch"] for p in job.curve]
    assert len(epochs) <= CURVE_POINTS and epochs[0] == 1 and epochs[-1] == 1000 and epochs == sorted(epochs)
    job.record_epoch(500, {"train_loss": 0.5})  # trained again from a resume: later points are replaced
    assert job.curve[-1] == {"epoch": 500, "train_loss": 0.5} and all(p["epoch"] < 500 for p in job.curve[:-1])


def test_a_rows_progress_is_its_epochs_or_its_blocks():
    job = Job(id="j-1", spec=JobSpec(kind="train", image="i", labels="l"), created_at=0, updated_at=0,
              epochs_done=3, epochs_total=12, metrics={"val_loss": 0.5, "val_iou": 0.7, "train_loss": 0.2})
    row = job_row(job)
    assert row["progress"] == 0.25 and row["held_out"] == {"val_iou": 0.7} and row["cancellable"]
    blockwise = Job(id="j-2", spec=JobSpec(kind="predict", image="v.zarr", model="m", output_format="zarr"),
                    created_at=0, updated_at=0, status=JobStatus.WAITING, blocks={"total": 10, "done": 4})
    assert job_row(blockwise)["progress"] == 0.4 and job_row(blockwise)["held_out"] == {}
    blockwise.status = JobStatus.CANCELLED
    assert not job_row(blockwise)["cancellable"]


def _overview(orch):
    client = SimpleNamespace(ledger=orch.ledger, settings=orch.settings, queue=orch.queue, signer=orch.queue.jobs.signer,
                             logs=lambda job: [f"log of {job.id}"], call=orch.handle)
    return Overview(client, node_infos=lambda: orch.node_infos)


def test_the_queue_is_listed_in_dispatch_order_with_stale_copies_marked(orch):
    low, high, mid = _submit(orch, priority=-5), _submit(orch, priority=50), _submit(orch)
    orch._enqueue(orch.ledger.get(mid), orch.clock_())  # a duplicate message: dropped at claim
    ov = _overview(orch)
    entries = ov.queue_entries()
    assert [(e.job, e.priority, e.current) for e in entries] == [(high, 50, True), (mid, 0, True), (mid, 0, False),
                                                                 (low, -5, True)]
    assert [e.position for e in entries] == [1, 2, 3, 4]


def test_nodes_show_the_newest_heartbeat_and_hardware(orch):
    _register(orch, "n1")
    _register(orch, "g1", gpus=[{"name": "A10G", "memory_bytes": 24 * 2**30}])
    orch.clock_.t += 4
    orch.handle({"type": "heartbeat", "node": "g1"})  # kept in memory: the ledger's copy is older
    ov = _overview(orch)
    rows = {n.id: n for n in ov.nodes(now=orch.clock_())}
    assert rows["g1"].accelerator == "gpu" and "A10G 24 GiB" in rows["g1"].hardware
    assert rows["g1"].heartbeat_age_s == 0
    assert rows["n1"].accelerator == "cpu" and rows["n1"].hardware.startswith("2 CPUs, 8 GiB")
    assert rows["n1"].kind == "static" and rows["n1"].price_usd_h is None  # an agent dlorch did not launch
    assert rows["n1"].heartbeat_age_s == 4
    orch.clock_.t += 60
    assert ov.nodes(now=orch.clock_()) == [] and len(ov.nodes(now=orch.clock_(), include_left=True)) == 2


def test_the_api_lists_jobs_and_cancels_through_the_orchestrator(orch):
    jid = _submit(orch, epochs=3, name="cells")
    app = create_app(_overview(orch), _call(orch))
    c = TestClient(app, base_url="http://127.0.0.1:8470")
    rows = c.get("/api/jobs").json()
    assert [(r["id"], r["name"], r["status"], r["cancellable"]) for r in rows] == [(jid, "cells", "queued", True)]
    assert c.get(f"/api/jobs/{jid}").json()["epochs_total"] == 3
    assert c.get(f"/api/jobs/{jid}/logs").json()["lines"] == [f"log of {jid}"]
    assert c.get("/api/jobs/j-nope").status_code == 404
    assert c.get("/api/jobs/..%2Fetc").status_code in (400, 404)
    r = c.post(f"/api/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json() == {"ok": True, "message": f"cancelled {jid}"}
    assert orch.ledger.get(jid).status is JobStatus.CANCELLED
    r = c.post(f"/api/jobs/{jid}/cancel")  # the orchestrator's refusal, as one line
    assert r.status_code == 400 and "cancelled" in r.json()["detail"]
    assert c.post("/api/nodes/nobody/drain").status_code == 400
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/queue", "/api/nodes", "/api/spend",
            "/api/jobs/{job_id}/cancel", "/api/nodes/{node_id}/drain"} <= set(paths)
    assert c.get("/api/spend").json()["text"] == "no cap set"


def _call(orch):
    from dlorch.core.errors import DlorchError

    def call(message):
        reply = orch.handle(message)
        if not reply.get("ok"):
            raise DlorchError(reply.get("reason", "request refused"))
        return reply

    return call


def test_spend_and_node_prices_come_from_the_fleets_records(orch):
    from dlorch.orchestrator.fleet import config as fleet_config
    from dlorch.orchestrator.fleet import records as rec
    from dlorch.orchestrator.fleet.model import ScaleConfig

    ov = _overview(orch)
    assert ov.spend().text == "no cap set" and ov.spend().cap_usd is None
    day = 86400.0 * 20000
    now = day + 7200
    orch.ledger.put_record(fleet_config.KEY, fleet_config.FleetConfig(
        scale=ScaleConfig(provider="ec2", max_nodes=2, cap_usd=5.0)).to_json(), fenced=False)
    r = rec.InstanceRecord(node_id="g1", provider="ec2", type="g5.xlarge", market="spot", ceiling_usd_h=0.5,
                           price_usd_h=0.4, reserve_usd=1.0, requested_at=now - 3700, state=rec.State.RUNNING,
                           instance_id="i-1", launched_at=now - 3600)
    orch.ledger.put_record(r.key, r.to_json())
    _register(orch, "g1", gpus=[{"name": "A10G", "memory_bytes": 24 * 2**30}])
    ov = _overview(orch)  # a fresh one: the fleet's records are read at most every few seconds
    spend = ov.fleet(now)[0]
    assert spend.cap_usd == 5.0 and abs(spend.spent_usd - 0.5) < 1e-6  # an hour at its ceiling
    assert spend.text == "$0.500 of $5.00 cap per 1d"
    node = ov.nodes(now=orch.clock_(), include_left=True)[0]
    assert (node.kind, node.price_usd_h) == ("ec2 g5.xlarge spot", 0.4)
