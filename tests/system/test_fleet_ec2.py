"""The elastic fleet on EC2, end to end against moto's server (EC2 and the S3 ledger) and a real redis-server:
the real orchestrator, the real fleet controller and policy, the real Ec2Provider wrapped in the fault wrapper,
and a simulated clock. moto's machines run nothing, so the test boots them: for every running instance whose
agent may register, a stand-in agent speaks the real protocol (register, heartbeat, claim, finish, hand back)
under the instance's node id, and vanishes when its instance is no longer listed."""

from __future__ import annotations

import threading
import time

import boto3
import pytest

from dlorch.core.errors import DlorchError
from dlorch.core.protocol import (Bye, Claim, Finish, Heartbeat, NodeAnnouncement, Register, Submit,
                                  parse_dispatch)
from dlorch.core.settings import Settings
from dlorch.core.spec import JobSpec
from dlorch.orchestrator.client import Client
from dlorch.orchestrator.fleet import config as fleet_config
from dlorch.orchestrator.fleet.config import FleetConfig
from dlorch.orchestrator.fleet.controller import FleetController
from dlorch.orchestrator.fleet.ec2 import TAG_DEPLOYMENT, TAG_NODE, Ec2Provider
from dlorch.orchestrator.fleet.faults import Fault, FaultyProvider
from dlorch.orchestrator.fleet.model import InstanceState, Market, ScaleConfig, Terminate
from dlorch.orchestrator.fleet.policy import LEAK, NEVER_REGISTERED
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import Orchestrator
from tests.system.harness import wait_for

DEPLOYMENT = "fleet-ec2"
JOBS = 40
WORK_S = 10.0  # simulated seconds each job takes on a node
TICK_S = 10.0
SCALE = ScaleConfig(provider="ec2", min_nodes=0, max_nodes=6, cap_usd=5.0, instance_types=("g5.xlarge", "g4dn.xlarge"),
                    spot=True, idle_s=20.0, tick_s=TICK_S, register_timeout_s=120.0, max_launch_per_tick=4)
GPU = [{"index": 0, "name": "NVIDIA A10G", "memory_bytes": 24 << 30, "capability": "8.6"}]


class SimClock:
    """The orchestrator's clock: wall time plus what the test skipped ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class StandIn:
    """A booted instance's agent: no work is done, but every message is the real one over the real queue."""

    def __init__(self, settings: Settings, node_id: str) -> None:
        self.node_id = node_id
        self.q = Queue(settings.resolved_queue(), Client(settings).signer, sender=node_id)
        self.registered = self.gone = False
        self.job: tuple[str, int] | None = None
        self.done_at = 0.0
        self.finished: list[str] = []

    def _ask(self, message) -> dict:
        return self.q.request(message, timeout=20)

    def _register(self) -> None:
        info = NodeAnnouncement(id=self.node_id, hostname=f"ip-{self.node_id}", pid=1, cpus=4,
                                memory_bytes=16 << 30, gpus=GPU)
        self._ask(Register(node_info=info))
        self.registered = True

    def step(self, now: float) -> None:
        if self.gone:
            return
        try:
            if not self.registered:
                self._register()
            if self.job is not None:
                job, token = self.job
                reply = self._ask(Heartbeat(node=self.node_id, job=job, token=token))
                if reply.get("register"):
                    self._register()
                if reply.get("drain"):
                    self.hand_back()
                elif reply.get("lease") is False:
                    self.job = None  # lost it (an outage longer than the lease): someone else runs it
                elif now >= self.done_at:
                    reply = self._ask(Finish(node=self.node_id, job=job, token=token, outcome="succeeded",
                                             epochs_done=1))
                    if reply.get("status") == "succeeded":
                        self.finished.append(job)
                    self.job = None
                if self.job is not None or self.gone:
                    return
            reply = self._ask(Heartbeat(node=self.node_id))
            if reply.get("register"):
                self._register()
            if reply.get("drain"):
                self.leave()
                return
            raw = self.q.jobs.receive(timeout=0.05)
            dispatch = parse_dispatch(raw, quiet=True) if raw is not None else None
            if dispatch is not None:
                claim = self._ask(Claim(node=self.node_id, job=dispatch.job, token=dispatch.token))
                if claim.get("ok"):
                    self.job, self.done_at = (dispatch.job, dispatch.token), now + WORK_S
        except DlorchError:  # the orchestrator is away (restarting): the next step tries again
            pass

    def hand_back(self) -> None:
        """What an agent does on a drain or a spot notice: give the job back, then leave."""
        if self.job is not None:
            job, token = self.job
            self._ask(Finish(node=self.node_id, job=job, token=token, outcome="handed_back", epochs_done=0))
            self.job = None
        self.leave()

    def leave(self) -> None:
        try:
            self._ask(Bye(node=self.node_id))
        except DlorchError:
            pass
        self.vanish()

    def vanish(self) -> None:
        self.gone = True
        self.q.close()


class SilenceNth:
    """Which launch's agent never registers: the ``n``-th one (its machine boots, its agent never comes up)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, request) -> bool:
        self.seen += 1
        return self.seen == self.n


class Deployment:
    """The orchestrator (on its own thread) and its fleet controller, as `dlorch up` runs them."""

    def __init__(self, settings: Settings, clock: SimClock, endpoint: str, silence: SilenceNth) -> None:
        self.client = Client(settings)
        self.orch = Orchestrator(settings, self.client.ledger, Queue(settings.resolved_queue(), self.client.signer),
                                 clock=clock)
        self.orch.lead()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.orch.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.ec2 = Ec2Provider(DEPLOYMENT, "us-east-1", "dlorch-node", endpoint_url=endpoint)
        self.faulty = FaultyProvider(self.ec2, never_register=silence, clock=clock)
        self.controller = FleetController(self.orch, self.faulty)

    def kill(self) -> None:
        """The process ends: its threads stop, nothing is handed over but what the ledger holds."""
        self.stop.set()
        self.thread.join(timeout=10)
        self.client.ledger.release_leadership(self.orch.me)  # the next one need not wait out a lease


def _all_instances(client) -> list[dict]:
    """Every instance of the deployment moto ever launched, terminated ones included."""
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [DEPLOYMENT]}])
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


@pytest.mark.slow
def test_ec2_fleet_scales_moves_work_survives_faults_and_a_restart(ec2, redis_server, tmp_path, monkeypatch):
    endpoint = ec2["AWS_ENDPOINT_URL"]
    aws = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    monkeypatch.setenv("DLORCH_DEPLOYMENT", DEPLOYMENT)
    settings = Settings(store="s3://bucket/dlorch", queue=redis_server.url, secret="fleet-test-secret",
                        deployment=DEPLOYMENT)
    clock = SimClock()
    silence = SilenceNth(3)  # of the launches that succeed: the third machine's agent never registers
    dep = Deployment(settings, clock, endpoint, silence)
    fleet_config.save(dep.client.ledger, FleetConfig(scale=SCALE, region="us-east-1", launch_template="dlorch-node"))
    standins: dict[str, StandIn] = {}
    try:
        # a machine of this deployment the ledger never recorded (a crashed run's, a hand launch): a leak
        leaked = aws.run_instances(LaunchTemplate={"LaunchTemplateName": "dlorch-node"}, MinCount=1, MaxCount=1,
                                   InstanceType="g5.xlarge", TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                       {"Key": TAG_DEPLOYMENT, "Value": DEPLOYMENT},
                                       {"Key": TAG_NODE, "Value": "leaked-1"}]}])["Instances"][0]["InstanceId"]
        submitter = Queue(settings.resolved_queue(), dep.client.signer)
        spec = JobSpec(kind="train", image="s3://bucket/in/image.npy", labels="s3://bucket/in/labels.npy", epochs=1)
        jobs = [submitter.request(Submit(spec=spec), timeout=30)["job"] for _ in range(JOBS)]
        # spot capacity for the cheapest type per unit of work is gone: the next type must take over at once
        shortage = Fault("capacity", type="g5.xlarge", market=Market.SPOT)
        dep.faulty.add(shortage)

        def boot(faulty: FaultyProvider) -> None:
            """Start a stand-in for each running instance (whose agent may register); vanish the ended ones."""
            listed = {i.node_id: i for i in faulty.inner.list() if i.node_id}
            for node_id, inst in listed.items():
                if (inst.state is InstanceState.RUNNING and node_id not in standins and node_id != "leaked-1"
                        and faulty.registers(node_id)):
                    standins[node_id] = StandIn(settings, node_id)
            for node_id, s in standins.items():
                if not s.gone and (node_id not in listed or listed[node_id].state is not InstanceState.RUNNING):
                    s.vanish()  # its machine is gone: what it held comes back when its lease runs out

        def hand_back_on_interruption(instance) -> None:
            s = standins.get(instance.node_id)
            if s is not None and not s.gone:
                s.hand_back()

        dep.faulty.on_interrupt.append(hand_back_on_interruption)

        def done() -> set[str]:
            """The jobs whose success the orchestrator confirmed (the ledger is read once, at the end: 40
            records a tick from moto's S3 would be most of this test's time)."""
            return {j for s in standins.values() for j in s.finished}

        launches: list[list[tuple[str, str]]] = []
        retired: list[tuple[str, str]] = []
        peak, interrupted_job, restarted, ticks = 0, None, False, 0

        def tick() -> None:
            nonlocal peak, ticks
            clock.advance(TICK_S)
            now = clock()
            for s in list(standins.values()):
                s.step(now)
            result = dep.controller.tick(now)
            ticks += 1
            launches.append([(r.type, r.market) for r in result.launched])
            if result.decision is not None:
                retired.extend((a.instance_id, a.reason) for a in result.decision.actions if isinstance(a, Terminate))
            live = [i for i in dep.ec2.list() if i.state in (InstanceState.PENDING, InstanceState.RUNNING)
                    and i.id != leaked]
            peak = max(peak, len(live))
            assert len(live) <= SCALE.max_nodes
            assert dep.controller.spent(now) <= SCALE.cap_usd  # the hard cap, at billing granularity
            assert result.decision is None or result.decision.reserved_usd <= SCALE.cap_usd + 1e-9
            boot(dep.faulty)

        # first tick: the leak goes, and every spot g5 launch is refused
        tick()
        first = dep.controller.last
        assert any(isinstance(a, Terminate) and a.instance_id == leaked and a.reason == LEAK
                   for a in first.decision.actions)
        assert first.failed and all(f.type == "g5.xlarge" and f.kind == "capacity" for f in first.failed)
        tick()  # within one tick the fleet moves to the next type
        assert launches[-1] and all(t != "g5.xlarge" or m != "spot" for t, m in launches[-1])
        assert leaked not in {i.id for i in dep.ec2.list()}

        while len(done()) < JOBS:
            tick()
            assert ticks < 80, f"{len(done())}/{JOBS} jobs done after {ticks} ticks"
            busy = [s for s in standins.values() if s.job is not None and not s.gone]
            if interrupted_job is None and busy and peak == SCALE.max_nodes:
                victim = busy[0]
                interrupted_job = victim.job[0]
                inst = next(i for i in dep.ec2.list() if i.node_id == victim.node_id)
                dep.faulty.interrupt(inst.id)  # reclaimed: its agent hands back, the job moves
            if not restarted and len(done()) >= JOBS // 2:
                before = {i.id for i in dep.ec2.list()}
                dep.kill()
                redis_server.kill()  # the queue goes too: only the S3 ledger and the machines remain
                redis_server.start()
                silent = dep.faulty.silent
                dep = Deployment(settings, clock, endpoint, silence)
                dep.faulty.silent |= silent  # the machine is still there, its agent still not up
                dep.faulty.add(shortage)  # and the cloud still has no spot g5 to give
                dep.faulty.on_interrupt.append(hand_back_on_interruption)
                restarted = True
                # its index of active jobs is read back from the ledger in real seconds, which the simulated
                # clock must not skip (it would look like an empty queue to scale in for)
                wait_for(lambda: dep.orch.active, 60, 0.1, what="the restarted orchestrator's active jobs")
                tick()
                readopted = dep.controller.last
                assert before <= readopted.snapshot.known  # every machine re-adopted by its tag and record
                assert not [a for a in readopted.decision.actions if isinstance(a, Terminate) and a.reason == LEAK]
        assert peak == SCALE.max_nodes and restarted and interrupted_job is not None
        assert all(dep.client.ledger.get(j).status.value == "succeeded" for j in jobs)  # every job, from the ledger

        moved = dep.client.ledger.get(interrupted_job)
        assert moved.attempts[0].outcome.value == "handed_back" and moved.status.value == "succeeded"

        # the queue drained: idle past idle_s, the fleet goes down to its minimum (0)
        for _ in range(20):
            tick()
            if not [i for i in dep.ec2.list() if i.state is not InstanceState.STOPPING]:
                break
        assert [i for i in dep.ec2.list() if i.state is not InstanceState.STOPPING] == []

        # the machine whose agent never came up was stopped once register_timeout_s had passed, and its type
        # recorded as a failure the policy avoids
        ghost = {i["InstanceId"] for i in _all_instances(aws)
                 if any(t["Key"] == TAG_NODE and t["Value"] in dep.faulty.silent for t in i["Tags"])}
        assert len(ghost) == 1 and [r for i, r in retired if i in ghost] == [NEVER_REGISTERED]
        assert any(f.kind == NEVER_REGISTERED for f in dep.controller.failures)

        everything = _all_instances(aws)
        nodes = [next(t["Value"] for t in i["Tags"] if t["Key"] == TAG_NODE) for i in everything]
        assert len(nodes) == len(set(nodes))  # no node id was launched twice, restart included
        assert all(i["InstanceType"] != "g5.xlarge" or i.get("InstanceLifecycle") != "spot"
                   for i in everything if i["InstanceId"] != leaked)
    finally:
        for s in standins.values():
            if not s.gone:
                s.vanish()
        dep.stop.set()
        dep.thread.join(timeout=10)


def test_ec2_reports_spot_prices_and_dates_the_end_of_terminated_instances(ec2):
    """What the cap and cost reports count: the spot price EC2 reports (moto's is a dummy, 0.00001) and when it
    was read, and the end of billing EC2 states in the instance's state transition (moto: "User initiated
    (… UTC)", whole seconds)."""
    from dlorch.orchestrator.fleet.model import LaunchRequest

    provider = Ec2Provider("prices-and-ends", "us-east-1", "dlorch-node", endpoint_url=ec2["AWS_ENDPOINT_URL"])
    spot = provider.launch(LaunchRequest("g4dn.xlarge", Market.SPOT, 0.526, "n-spot"))
    on_demand = provider.launch(LaunchRequest("g4dn.xlarge", Market.ON_DEMAND, 0.526, "n-od"))
    before_list = time.time()
    listed = {i.id: i for i in provider.list()}
    assert listed[spot.id].price_usd_h == pytest.approx(0.00001)
    assert before_list <= listed[spot.id].price_as_of <= time.time()  # when it was read: the cap counts it to then
    assert listed[on_demand.id].price_usd_h is None  # the price table's list price stands
    assert provider.ended([spot.id]) == {}  # still running: nothing to date
    before = time.time()
    provider.terminate([spot.id])
    after = time.time()
    ended = provider.ended([spot.id, on_demand.id])
    assert list(ended) == [spot.id] and before - 1 <= ended[spot.id] <= after
    assert provider.ended(["i-0123456789abcdef0"]) == {}  # not this deployment's (or unknown): left out
