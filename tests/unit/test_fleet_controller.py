"""The fleet controller against an in-memory provider (a fault seam) and the in-process orchestrator.

Intent recorded before launch, a restarted controller re-adopting its fleet by node id, no launch twice,
billing that accumulates and survives a restart, leaks and refusals recorded (simulated clock).
"""

from __future__ import annotations

import dataclasses

import pytest

from dlorch.orchestrator.fleet import records as rec
from dlorch.orchestrator.fleet.config import FleetConfig
from dlorch.orchestrator.fleet.controller import FleetController
from dlorch.orchestrator.fleet.model import (CapacityError, Decision, Instance, InstanceState, Launch, LaunchRequest,
                                             Market, ScaleConfig)
from dlorch.orchestrator.fleet.prices import load_prices


class MemProvider:
    """Instances in a dict; launch is idempotent by node id (as EC2's ClientToken and the local provider are)."""

    name = "mem"

    def __init__(self, clock, fail: dict[str, Exception] | None = None) -> None:
        self.clock, self.fail = clock, dict(fail or {})
        self.instances: dict[str, Instance] = {}
        self.launches: list[str] = []
        self.terminated: list[str] = []
        self.on_launch = None
        self.crash_after_launch = False
        self.count = 0

    def launch(self, request: LaunchRequest) -> Instance:
        self.launches.append(request.node_id)
        if self.on_launch:
            self.on_launch(request)
        if request.type in self.fail:
            raise self.fail[request.type]
        for inst in self.instances.values():
            if inst.node_id == request.node_id:
                return inst
        self.count += 1
        inst = Instance(id=f"i-{self.count - 1:04d}", provider="mem", type=request.type, market=request.market,
                        price_ceiling_usd_h=request.price_ceiling_usd_h, state=InstanceState.RUNNING,
                        launched_at=self.clock(), node_id=request.node_id, zone=request.zone)
        self.instances[inst.id] = inst
        if self.crash_after_launch:
            raise ConnectionError("connection reset after the launch went through")
        return inst

    def terminate(self, instance_ids: list[str]) -> None:
        self.terminated += instance_ids
        for i in instance_ids:
            self.instances.pop(i, None)

    def list(self) -> list[Instance]:
        return list(self.instances.values())


EC2 = ScaleConfig(provider="ec2", max_nodes=2, cap_usd=10.0, instance_types=("g4dn.xlarge",), tick_s=10.0,
                  idle_s=120.0, register_timeout_s=300.0)


def _submit(o, **kw):
    spec = {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy", **kw}
    return o.handle({"type": "submit", "spec": spec})["job"]


def _register(o, node):
    o.handle({"type": "register", "node_info": {"id": node, "hostname": "h", "pid": 1, "cpus": 2,
                                                  "memory_bytes": 1, "gpus": [{"name": "T4", "memory_bytes": 1}],
                                                  "torch": "x"}})


def _controller(orch, provider, scale=EC2, **kw):
    return FleetController(orch, provider, config=FleetConfig(scale=scale), prices=load_prices(), **kw)


def test_the_intent_is_in_the_ledger_before_the_provider_is_asked(orch):
    provider = MemProvider(orch.clock_)
    seen = []
    provider.on_launch = lambda req: seen.append(orch.ledger.record(f"{rec.INSTANCES}/{req.node_id}"))
    _submit(orch)
    result = _controller(orch, provider).tick()
    assert len(result.launched) == 1 and len(seen) == 1
    assert seen[0]["state"] == "launching" and seen[0]["instance_id"] is None and seen[0]["type"] == "g4dn.xlarge"
    assert seen[0]["reserve_usd"] > 0
    after = orch.ledger.record(f"{rec.INSTANCES}/{result.launched[0].node_id}")
    assert after["state"] == "running" and after["instance_id"] == "i-0000"


def test_a_restart_re_adopts_its_fleet_and_launches_nothing_twice(orch):
    provider = MemProvider(orch.clock_)
    provider.crash_after_launch = True  # the machine started, its id never reached the ledger
    _submit(orch)
    first = _controller(orch, provider)
    assert first.tick().launched == []
    assert list(provider.instances) == ["i-0000"]
    node_id = provider.instances["i-0000"].node_id
    assert orch.ledger.record(f"{rec.INSTANCES}/{node_id}")["instance_id"] is None
    provider.crash_after_launch = False

    orch.clock_.t += 10
    again = _controller(orch, provider)  # a new orchestrator: only the ledger and the provider's list
    result = again.tick()
    assert result.adopted == ["i-0000"] and result.terminated == [] and result.launched == []
    assert result.snapshot.known == frozenset({"i-0000"})
    assert len(provider.instances) == 1  # the booting instance serves the queued job: no second machine
    assert orch.ledger.record(f"{rec.INSTANCES}/{node_id}")["instance_id"] == "i-0000"
    for _ in range(3):
        orch.clock_.t += 10
        assert again.tick().launched == []
    assert len(provider.instances) == 1


def test_an_intent_whose_launch_was_never_confirmed_is_asked_again_under_its_node_id(orch):
    provider = MemProvider(orch.clock_)
    _submit(orch)
    c = _controller(orch, provider)
    c.tick()
    node_id = provider.launches[0]
    inst = provider.instances.pop("i-0000")  # not listed yet (a provider's list lags its launches)
    r = orch.ledger.record(f"{rec.INSTANCES}/{node_id}")
    orch.ledger.put_record(f"{rec.INSTANCES}/{node_id}", {**r, "state": "launching", "instance_id": None})
    provider.instances[inst.id] = inst
    restarted = _controller(orch, provider)
    orch.clock_.t += 5
    result = restarted.tick()
    assert result.adopted == ["i-0000"] and len(provider.instances) == 1


def test_billing_accumulates_at_the_ceiling_and_survives_a_restart(orch):
    provider = MemProvider(orch.clock_)
    jid = _submit(orch)
    c = _controller(orch, provider)
    t0 = orch.clock_.t
    node_id = c.tick().launched[0].node_id
    ceiling = load_prices().ceiling("g4dn.xlarge", Market.SPOT)
    orch.clock_.t += 30  # within the billing minimum: what has run so far
    assert c.spent(orch.clock_.t) == pytest.approx(ceiling * 30 / 3600)
    orch.clock_.t += 570
    _register(orch, node_id)  # its agent is up: the queued job has a node, nothing more is launched
    assert c.tick().launched == []
    assert c.spent(orch.clock_.t) == pytest.approx(ceiling * 600 / 3600)
    assert orch.ledger.get(jid).status.value == "queued"  # the controller never writes a job
    orch.handle({"type": "cancel", "job": jid})  # nothing to launch again for
    provider.terminate(["i-0000"])  # gone (an interruption): billing stops at the first tick without it
    orch.clock_.t += 70
    assert c.tick().ended == ["i-0000"]
    end = orch.clock_.t
    orch.clock_.t += 1000
    expected = ceiling * (end - t0) / 3600
    assert c.spent(orch.clock_.t) == pytest.approx(expected)
    restarted = _controller(orch, provider)
    restarted.load()
    assert restarted.spent(orch.clock_.t) == pytest.approx(expected)
    record = orch.ledger.record(f"{rec.INSTANCES}/{node_id}")
    assert record["ended_at"] == end and record["launched_at"] == t0


def test_spot_prices_the_provider_reports_are_billed_and_billing_ends_where_it_dates_the_end(orch):
    """The cap counts a reported price where it is known to have been in effect and the ceiling elsewhere;
    cost reports each reported price until the next; billing ends when the provider says it did."""
    from dlorch.orchestrator.fleet import costview

    provider = MemProvider(orch.clock_)

    def launch_once(snapshot, now):  # the machine's life is the test's, not the policy's
        if provider.launches:
            return Decision()
        ceiling = load_prices().ceiling("g4dn.xlarge", Market.SPOT)
        return Decision(actions=[Launch(LaunchRequest("g4dn.xlarge", Market.SPOT, ceiling, "n-1"), 0.0, "test")])

    c = _controller(orch, provider, policy=launch_once)
    t0 = orch.clock_.t
    c.tick()
    ceiling = load_prices().ceiling("g4dn.xlarge", Market.SPOT)

    def report(price, since):
        provider.instances["i-0000"] = dataclasses.replace(provider.instances["i-0000"], price_usd_h=price,
                                                           price_since=since)

    assert c.spent(t0 + 10) == pytest.approx(ceiling * 10 / 3600)  # no price reported yet
    report(0.2, t0 - 500)
    for _ in range(60):  # read at every tick: 0.2 from before the launch to t0 + 600
        orch.clock_.t += 10
        c.tick()
    assert c.spent(orch.clock_.t) == pytest.approx(0.2 * 600 / 3600)
    report(0.5, t0 + 650)  # a new price since t0 + 650; t0 + 600 to + 650 was never reported
    orch.clock_.t += 100
    c.tick()
    assert c.spent(orch.clock_.t) == pytest.approx((0.2 * 600 + ceiling * 50 + 0.5 * 50) / 3600)
    provider.terminate(["i-0000"])
    provider.ended = lambda ids: {i: t0 + 900.0 for i in ids}  # it stopped billing at t0 + 900
    orch.clock_.t += 1000
    assert c.tick().ended == ["i-0000"]
    record = rec.InstanceRecord.from_json(orch.ledger.record(f"{rec.INSTANCES}/n-1"))
    assert record.ended_at == t0 + 900.0
    assert c.spent(orch.clock_.t) == pytest.approx((0.2 * 600 + ceiling * 50 + 0.5 * 50 + ceiling * 200) / 3600)
    total = costview.report(orch.ledger, "type", now=orch.clock_.t)["total_usd"]
    assert total == pytest.approx((0.2 * 650 + 0.5 * 250) / 3600)
    assert provider.launches == ["n-1"]
    assert rec.node_fleet_info(orch.ledger, orch.clock_.t)["n-1"]["price_usd_h"] == 0.5  # `dlorch nodes`: the latest


def test_an_instance_the_ledger_never_recorded_is_terminated(orch):
    provider = MemProvider(orch.clock_)
    provider.instances["i-leak"] = Instance("i-leak", "mem", "g4dn.xlarge", Market.SPOT, 0.5, InstanceState.RUNNING,
                                            orch.clock_.t, node_id="someone-else")
    result = _controller(orch, provider).tick()
    assert result.terminated == ["i-leak"] and provider.instances == {}


def test_a_refused_launch_is_recorded_and_the_next_tick_takes_another_type(orch):
    provider = MemProvider(orch.clock_, fail={"g5.xlarge": CapacityError("InsufficientInstanceCapacity")})
    _submit(orch)
    scale = dataclasses.replace(EC2, instance_types=("g4dn.xlarge", "g5.xlarge"))
    c = _controller(orch, provider, scale=scale)
    first = c.tick()
    assert [f.kind for f in first.failed] == ["capacity"] and first.launched == []
    assert orch.ledger.records(rec.FAILURES)[0]["type"] == "g5.xlarge"  # the cheapest per unit of work
    orch.clock_.t += 10
    second = c.tick()
    assert [r.type for r in second.launched] == ["g4dn.xlarge"]
    restarted = _controller(orch, provider, scale=scale)
    restarted.load()
    assert [f.type for f in restarted.failures] == ["g5.xlarge"]


def test_an_idle_node_is_drained_through_the_orchestrator_and_its_machine_then_stopped(orch):
    provider = MemProvider(orch.clock_)
    _submit(orch)
    c = _controller(orch, provider, scale=dataclasses.replace(EC2, idle_s=60.0))
    node_id = c.tick().launched[0].node_id
    _register(orch, node_id)
    msg = orch.queue.jobs.receive(timeout=0.5)
    job, token = msg["job"], msg["token"]
    orch.handle({"type": "claim", "job": job, "token": token, "node": node_id})
    orch.handle({"type": "heartbeat", "node": node_id, "job": job, "token": token})
    orch.handle({"type": "finish", "job": job, "token": token, "node": node_id, "outcome": "succeeded",
                 "epochs_done": 3, "model": f"{orch.store_url}/jobs/{job}/attempts/{token}/model.ckpt"})
    orch.handle({"type": "heartbeat", "node": node_id})
    drained = []
    for _ in range(12):
        orch.clock_.t += 10
        orch.handle({"type": "heartbeat", "node": node_id})
        result = c.tick()
        drained += result.drained
        orch.step(timeout=0)  # the drain runs on the orchestrator's thread
    assert drained == [node_id] and orch.ledger.node(node_id).drain
    assert provider.terminated == ["i-0000"]
    assert c.rates["g4dn.xlarge"].work == 3


def test_a_running_job_whose_node_is_gone_is_demand_awaiting_requeue(orch):
    """Until its lease lapses (after a restart: up to a lease later) such a job is neither queued nor held:
    the policy sees it as work awaiting requeue, so the machine it will go to is not retired meanwhile."""
    provider = MemProvider(orch.clock_)
    job = _submit(orch)
    c = _controller(orch, provider)
    node_id = c.tick().launched[0].node_id
    _register(orch, node_id)
    msg = orch.queue.jobs.receive(timeout=0.5)
    orch.handle({"type": "claim", "job": job, "token": msg["token"], "node": node_id})
    orch.handle({"type": "heartbeat", "node": node_id, "job": job, "token": msg["token"]})
    orch.clock_.t += 1
    assert c.tick().snapshot.queue == ()  # held and reported by a live node
    orch.clock_.t += orch.settings.lease_s + 1  # the node went silent; the orchestrator has not requeued yet
    (waiting,) = c.tick().snapshot.queue
    assert waiting.job_id == job and waiting.awaiting_requeue


def test_a_scripted_policy_drives_the_controller(orch):
    """The seam: any ``step(snapshot, now) -> Decision`` (the policy is pure) is carried out as decided."""
    provider = MemProvider(orch.clock_)
    calls = []

    def policy(snapshot, now):
        calls.append(snapshot)
        if len(calls) > 1:
            return Decision()
        req = LaunchRequest("local", Market.STATIC, 0.0, "n-1")
        return Decision(actions=[Launch(req, 0.0, "test")])

    c = _controller(orch, provider, scale=ScaleConfig(provider="local", max_nodes=1), policy=policy)
    c.tick()
    orch.clock_.t += 5
    c.tick()
    assert provider.launches == ["n-1"] and calls[1].known == frozenset({"i-0000"})
    assert calls[1].config.billing_min_s == 0.0  # a free provider has no billing minimum to use up


def test_cost_splits_billing_over_jobs_and_idle_and_reconciles_after_a_restart(orch, tmp_path):
    from dlorch.orchestrator.fleet import costview
    from dlorch.orchestrator.ledger import Ledger
    from dlorch.orchestrator.statestore import LocalDirStateStore

    provider = MemProvider(orch.clock_)
    jid = _submit(orch)
    c = _controller(orch, provider)
    node_id = c.tick().launched[0].node_id  # billing from t = 1000
    orch.clock_.t += 100
    _register(orch, node_id)
    msg = orch.queue.jobs.receive(timeout=0.5)
    orch.handle({"type": "claim", "job": jid, "token": msg["token"], "node": node_id})  # lease from 1100
    orch.clock_.t += 600
    orch.handle({"type": "finish", "job": jid, "token": msg["token"], "node": node_id, "outcome": "succeeded",
                 "epochs_done": 2, "model": f"{orch.store_url}/jobs/{jid}/attempts/{msg['token']}/model.ckpt"})
    orch.clock_.t += 400
    provider.terminate(["i-0000"])
    c.tick()  # billing ends at 2100
    price = load_prices().table[("g4dn.xlarge", "spot")]
    report = costview.report(orch.ledger, "job", now=5000.0)
    rows = {r["key"]: r for r in report["rows"]}
    assert rows[jid]["usd"] == pytest.approx(price * 600 / 3600) and rows[jid]["node_hours"] == pytest.approx(600 / 3600)
    assert rows["idle"]["usd"] == pytest.approx(price * 500 / 3600)
    assert report["total_usd"] == pytest.approx(price * 1100 / 3600) and report["reconciles"]
    by_type = costview.report(orch.ledger, "type", now=5000.0)
    assert [(r["key"], round(r["usd"], 9)) for r in by_type["rows"]] == [("g4dn.xlarge", round(price * 1100 / 3600, 9))]
    restarted = Ledger(LocalDirStateStore(tmp_path / "ledger"))  # what a new orchestrator reads
    assert costview.report(restarted, "job", now=5000.0)["rows"] == report["rows"]


def test_training_wants_a_gpu_only_where_the_fleet_can_launch_a_known_one(orch):
    _submit(orch)
    local = _controller(orch, MemProvider(orch.clock_), scale=ScaleConfig(provider="local", max_nodes=1),
                        policy=lambda s, now: Decision())
    assert [w.gpu for w in local.tick().snapshot.queue] == [False]  # a local agent (GPU or not) may take it
    ec2 = _controller(orch, MemProvider(orch.clock_), policy=lambda s, now: Decision())
    assert [w.gpu for w in ec2.tick().snapshot.queue] == [True]  # g4dn.xlarge has a T4


def test_a_blockwise_job_is_charged_for_the_nodes_that_ran_its_blocks(tmp_path):
    from dlorch.core.spec import Job, JobSpec, JobStatus
    from dlorch.orchestrator.fleet import costview
    from dlorch.orchestrator.fleet.records import InstanceRecord
    from dlorch.orchestrator.ledger import Ledger
    from dlorch.orchestrator.statestore import LocalDirStateStore

    ledger = Ledger(LocalDirStateStore(tmp_path / "ledger"))
    spec = JobSpec(kind="predict", image="/s/v.zarr", model="/s/m.ckpt", output_format="zarr")
    ledger.create(Job(id="j-blocks", spec=spec, status=JobStatus.SUCCEEDED, created_at=0.0, updated_at=400.0,
                      blocks={"total": 8, "done": 8, "by_node": {"n-1": 8}, "started_at": 100.0,
                              "finished_at": 400.0}))
    ledger.put_record("fleet/instances/n-1", InstanceRecord(
        node_id="n-1", provider="ec2", type="c6i.2xlarge", market="spot", ceiling_usd_h=0.34, price_usd_h=0.36,
        reserve_usd=0.1, requested_at=0.0, state="ended", instance_id="i-1", launched_at=0.0,
        ended_at=500.0).to_json())
    rows = {r["key"]: r["usd"] for r in costview.report(ledger, "job", now=1000.0)["rows"]}
    assert rows["j-blocks"] == pytest.approx(0.36 * 300 / 3600) and rows["idle"] == pytest.approx(0.36 * 200 / 3600)
