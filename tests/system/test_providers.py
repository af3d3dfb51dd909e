"""One contract for every compute provider, run against each real backend: local agent processes, EC2 (moto's
server over HTTP) and Slurm (a one-node slurmctld + slurmd on this machine, started here), plus the fault
wrapper at the same seam."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from dlorch.orchestrator.fleet.faults import Fault, FaultyProvider
from dlorch.orchestrator.fleet.model import (
    CapacityError,
    InstanceState,
    LaunchRequest,
    Market,
    QuotaError,
    ThrottledError,
)
from tests.conftest import free_port
from tests.system.harness import Cluster, wait_for

LIVE = (InstanceState.PENDING, InstanceState.RUNNING)
REPO = Path(__file__).resolve().parents[2]
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


class SlurmCluster:
    """munged, slurmctld and slurmd on this machine (one node, one partition "debug"), owned by the test."""

    def __init__(self, tmp: Path) -> None:
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        self.exe = {n: shutil.which(n, path=path) for n in SLURM_BINARIES}
        missing = [n for n, p in self.exe.items() if p is None]
        if missing:
            pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): `make slurm` "
                        "(apt-get install -y slurm-wlm munge)")
        if os.geteuid() != 0:
            pytest.skip("the one-node Slurm of the tests runs its daemons as root (SlurmUser=root)")
        self.dir = tmp / "slurm"
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        d = self.dir
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(self.exe["munged"], "--foreground", "--force", f"--key-file={key}", f"--socket={d / 'munge.sock'}",
                    f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'log/munged.log'}",
                    f"--seed-file={d / 'munge.seed'}")
        wait_for(lambda: (d / "munge.sock").exists(), 10, 0.05, what="munged")
        self.conf.write_text("\n".join([
            "ClusterName=dlorchtest", f"SlurmctldHost={self.host}", f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "CredType=cred/munge", f"AuthInfo=socket={d / 'munge.sock'}", f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}", f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}", f"SlurmctldLogFile={d / 'log/slurmctld.log'}",
            f"SlurmdLogFile={d / 'log/slurmd.log'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "KillWait=60", "MinJobAge=5",
            # the agents are light: many share the machine's cores, as on an oversubscribed partition
            f"NodeName={self.host} CPUs={os.cpu_count() or 1} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:16",
            ""]))
        self._spawn(self.exe["slurmctld"], "-D", "-i", "-f", str(self.conf))
        self._spawn(self.exe["slurmd"], "-D", "-f", str(self.conf))
        wait_for(self._idle, 30, 0.3, what=f"the Slurm node to be idle\n{self.logs()}")

    def _spawn(self, *cmd: str) -> None:
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _idle(self) -> bool:
        cp = subprocess.run([self.exe["sinfo"], "--noheader", "--format=%t"], env=self.env, capture_output=True,
                            text=True)
        return cp.returncode == 0 and cp.stdout.strip() == "idle"

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((self.dir / "log").glob("*.log")))

    def stop(self) -> None:
        # end the jobs first: slurmstepd and the agents under it outlive a killed slurmd
        subprocess.run([self.exe["scancel"], "--me", "--full", "--signal=KILL"], env=self.env, capture_output=True)
        try:
            wait_for(lambda: not subprocess.run([self.exe["squeue"], "--me", "--noheader"], env=self.env,
                                                capture_output=True, text=True).stdout.strip(), 20, 0.3, what="jobs")
        except AssertionError:
            pass
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    cluster = SlurmCluster(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Backend:
    """One provider under the contract: how to make it for a deployment, what a launch asks and lists."""

    name: str
    make: Callable[[str], object]
    type: str
    market: Market
    ceiling: float
    zone: str | None = None

    def request(self, node_id: str) -> LaunchRequest:
        return LaunchRequest(self.type, self.market, self.ceiling, node_id, zone=self.zone)


def _backend(kind: str, request, tmp_path: Path, made: list) -> Backend:
    def keep(provider):
        made.append(provider)
        return provider

    if kind == "local":
        from dlorch.core.settings import Settings
        from dlorch.orchestrator.fleet.local import LocalProvider

        # a terminated agent may still be importing its engine (seconds on a busy machine) before it can leave
        return Backend("local", lambda dep: keep(LocalProvider(dep, settings=Settings(), grace_s=60)), "local",
                       Market.STATIC, 0.0)
    if kind == "ec2":
        import boto3

        from dlorch.orchestrator.fleet.ec2 import Ec2Provider

        aws = request.getfixturevalue("ec2")
        session = boto3.Session()
        return Backend("ec2", lambda dep: keep(Ec2Provider(dep, aws["region"], aws["launch_template"],
                                                           session=session, endpoint_url=aws["AWS_ENDPOINT_URL"])),
                       "g5.xlarge", Market.SPOT, 0.52, zone="us-east-1b")
    from dlorch.orchestrator.fleet.slurm import SlurmProvider

    request.getfixturevalue("slurm")
    # the deployment's own batch script: the agent as an srun step, a TERM of the batch shell passed on to it
    request.getfixturevalue("monkeypatch").setenv("DLORCH_BIN", str(Path(sys.executable).parent / "dlorch"))
    script = REPO / "infra" / "slurm" / "dlorch-agent.sbatch"
    return Backend("slurm", lambda dep: keep(SlurmProvider(dep, script, log_dir=tmp_path, grace_s=60)), "slurm",
                   Market.STATIC, 0.0)


def _end_all(made: list, local: bool) -> None:
    """Nothing a test launched outlives it."""
    for provider in made:
        try:
            left = [i.id for i in provider.list()]
            if left:
                provider.terminate(left)
        except Exception:
            pass
    if local:
        for provider in made:
            wait_for(lambda p=provider: not p.list(), 90, 0.3, what="local agents to end")


@pytest.fixture(params=["local", "ec2", "slurm"])
def backend(request, home, tmp_path):
    made: list = []
    yield _backend(request.param, request, tmp_path, made)
    _end_all(made, request.param == "local")


@pytest.fixture(params=["local", "slurm"])
def agent_backend(request, home, tmp_path):
    """The backends whose instances run a real ``dlorch agent`` here."""
    made: list = []
    yield _backend(request.param, request, tmp_path, made)
    _end_all(made, request.param == "local")


def _listed(provider, instance_id: str):
    return next((i for i in provider.list() if i.id == instance_id), None)


class TestProviderContract:
    def test_launch_list_terminate(self, backend):
        p = backend.make("contract")
        t0 = time.time()
        launched = p.launch(backend.request("n-1"))
        assert (launched.provider, launched.node_id, launched.market) == (backend.name, "n-1", backend.market)
        assert launched.price_ceiling_usd_h == pytest.approx(backend.ceiling)
        assert launched.state in LIVE

        want = InstanceState.RUNNING
        listed = wait_for(lambda: (i := _listed(p, launched.id)) and i.state is want and i, 30, 0.3,
                          what=f"{launched.id} running")
        assert (listed.node_id, listed.market, listed.provider) == ("n-1", backend.market, backend.name)
        assert listed.price_ceiling_usd_h == pytest.approx(backend.ceiling)
        assert t0 - 2 <= listed.launched_at <= time.time() + 1  # billing start: when it was launched
        if backend.zone:
            assert listed.zone == backend.zone
        other = p.launch(backend.request("n-2"))
        assert {i.node_id for i in p.list()} == {"n-1", "n-2"}

        p.terminate([launched.id])
        after = _listed(p, launched.id)
        assert after is None or after.state is InstanceState.STOPPING
        wait_for(lambda: _listed(p, launched.id) is None, 30, 0.3, what=f"{launched.id} gone")
        assert [i.id for i in p.list()] == [other.id]  # the other one is untouched
        p.terminate([launched.id])  # terminating one that is gone is no error

    def test_launch_is_idempotent_by_node_id(self, backend):
        p = backend.make("idem")
        first = p.launch(backend.request("n-same"))
        again = p.launch(backend.request("n-same"))
        restarted = backend.make("idem")  # a controller restarted after a crash retries its launch
        third = restarted.launch(backend.request("n-same"))
        assert first.id == again.id == third.id
        assert [i.node_id for i in restarted.list()] == ["n-same"]

    def test_each_deployment_sees_only_its_own(self, backend):
        mine, theirs = backend.make("dep"), backend.make("dep-x")  # a name that is a prefix of the other
        a = mine.launch(backend.request("x-1"))  # Slurm job name dlorch-dep-x-1, as if dep-x's node "1"
        b = theirs.launch(backend.request("1"))
        assert [i.id for i in mine.list()] == [a.id]
        assert [i.id for i in theirs.list()] == [b.id]
        theirs.terminate([a.id])  # another deployment's id is left alone
        time.sleep(0.5)
        assert _listed(mine, a.id) is not None
        survivor = _listed(backend.make("dep"), a.id)  # a restarted orchestrator lists its survivors
        assert survivor is not None and survivor.node_id == "x-1"

    @pytest.mark.slow
    def test_launched_agent_registers_under_its_node_id(self, agent_backend, home, tmp_path):
        backend = agent_backend
        with Cluster(tmp_path, home):
            p = backend.make("reg")
            launched = p.launch(backend.request("n-reg"))
            node_file = home / "ledger" / "nodes" / "n-reg.json"
            wait_for(node_file.exists, 60, 0.3, what="the agent to register as n-reg")
            p.terminate([launched.id])
            wait_for(lambda: _listed(p, launched.id) is None, 90, 0.3, what="the agent to end")
            log = p.log_path("n-reg").read_text() if backend.name == "local" else ""
            assert json.loads(node_file.read_text())["state"] == "gone", log  # it left cleanly, not killed

    def test_faults_at_the_seam(self, backend):
        p = backend.make("faulty")
        f = FaultyProvider(p, [Fault("capacity", type=backend.type, market=backend.market)])
        with pytest.raises(CapacityError):
            f.launch(backend.request("n-refused"))
        assert p.list() == [] and f.count("capacity") == 1  # refused before the provider saw it

        f.clear()
        f.add(Fault("quota", zone="elsewhere"))  # another zone's rule leaves this launch alone
        throttle = f.add(Fault("throttled", calls=("list",), times=1))
        launched = f.launch(backend.request("n-ok"))
        with pytest.raises(ThrottledError):
            f.list()
        assert [i.id for i in f.list()] == [launched.id]  # the throttling rule was used up
        assert throttle.times == 0 and f.count("quota") == 0

        heard = []
        f.on_interrupt.append(heard.append)
        f.interrupt(launched.id)
        assert [i.node_id for i in heard] == ["n-ok"] and launched.id in f.interrupted
        wait_for(lambda: _listed(p, launched.id) is None, 30, 0.3, what="the interrupted instance gone")

        silent = FaultyProvider(p, never_register={"n-silent"})
        ghost = silent.launch(backend.request("n-silent"))
        assert not silent.registers("n-silent") and silent.registers("n-ok")
        assert _listed(p, ghost.id) is not None  # it exists (and bills) all the same
        if backend.name == "local":  # its agent is held before it could register
            def held() -> bool:
                stat = Path(f"/proc/{ghost.id[6:]}/stat").read_text()
                return stat[stat.rfind(")") + 2] == "T"

            wait_for(held, 5, 0.05, what="the silent agent stopped")
        p.terminate([ghost.id])
        wait_for(lambda: _listed(p, ghost.id) is None, 30, 0.3, what="the silent instance gone")
        with pytest.raises(QuotaError):
            FaultyProvider(p, [Fault("quota")]).launch(backend.request("n-quota"))


def test_spot_notice_reaches_the_agents_own_poller(home):
    """An injected interruption posts the notice a real agent's poller reads (as from EC2's metadata service),
    then ends the machine once the notice period is over."""
    from dlorch.core.settings import Settings
    from dlorch.nodeagent.interrupts import SpotNoticePoller, StopFlag
    from dlorch.orchestrator.fleet.faults import SpotNotices
    from dlorch.orchestrator.fleet.local import LocalProvider

    notices = SpotNotices()
    local = LocalProvider("spot", settings=Settings(), grace_s=30,
                          agent_args=["--spot-notices", notices.url_for("{node_id}")])
    f = FaultyProvider(local, notices=notices)
    try:
        launched = f.launch(LaunchRequest("local", Market.STATIC, 0.0, "n-spot"))
        assert notices.url_for("n-spot") in Path(f"/proc/{launched.id[6:]}/cmdline").read_text().split("\0")
        flag, other = StopFlag(), StopFlag()
        poller = SpotNoticePoller(flag, notices.url_for("n-spot"))
        bystander = SpotNoticePoller(other, notices.url_for("n-other"))
        assert poller.step(time.time()) is None and not flag.is_set()  # no notice yet

        f.interrupt(launched.id, notice_s=1.0)
        notice = poller.step(time.time())
        assert notice and json.loads(notice)["action"] == "terminate" and flag.is_set()
        assert bystander.step(time.time()) is None and not other.is_set()  # only the interrupted node hears it
        assert _listed(local, launched.id) is not None  # the notice comes first; the machine ends after it
        wait_for(lambda: _listed(local, launched.id) is None, 30, 0.2, what="the interrupted agent gone")
    finally:
        left = [i.id for i in local.list()]
        if left:
            local.terminate(left)
        notices.close()
