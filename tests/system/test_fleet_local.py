"""The embedded default made elastic: `dlorch up --max-nodes 2` with no agents starts local agents when jobs
arrive and retires them once idle; `dlorch cost` and `dlorch nodes` read what the fleet recorded (real processes)."""

import json
import signal

import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import cli_env, dlorch, spawn, wait_for


def _records(home, kind):
    folder = home / "ledger" / "fleet" / kind
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _jobs(home):
    return {p.stem: json.loads(p.read_text()) for p in (home / "ledger" / "jobs").glob("*.json")}


@pytest.mark.slow
def test_up_with_max_nodes_launches_local_agents_for_work_and_retires_them_when_idle(home, tmp_path):
    env = cli_env(DLORCH_LEASE_S="5", DLORCH_HEARTBEAT_S="1")
    img, lab = synthetic_pair(tmp_path)
    dlorch("scale", "--idle-minutes", "0.1", "--tick", "1s", env=env)  # retire after 6 s idle, decide every 1 s
    up = spawn("up", "--max-nodes", "2", env=env, log=tmp_path / "up.log")
    try:
        wait_for(lambda: (home / "ledger" / "leader.json").exists(), 30, what="orchestrator")
        assert _records(home, "instances") == []  # no work: nothing launched
        ids = [dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / f"{i}.tif"), "--epochs", "1",
                      "--detach", env=env).stdout.strip() for i in range(3)]
        final = wait_for(lambda: (js := _jobs(home)) and all(js[i]["status"] == "succeeded" for i in ids) and js,
                         300, 0.5, what="the three jobs to succeed")
        launched = _records(home, "instances")
        assert 1 <= len(launched) <= 2 and {r["provider"] for r in launched} == {"local"}
        nodes = {r["node_id"] for r in launched}
        assert {final[i]["attempts"][-1]["node"] for i in ids} <= nodes  # the fleet's agents ran every job
        listing = json.loads(dlorch("nodes", "--json", "--all", env=env).stdout)
        assert {n["id"] for n in listing if n["fleet"]["kind"] == "local"} == nodes

        # idle for 6 s: drained, their processes end, their records close
        ended = wait_for(lambda: (rs := _records(home, "instances")) and all(r["state"] == "ended" for r in rs) and rs,
                         120, 0.5, what="the idle agents to be retired")
        assert all(r["ended_at"] >= r["launched_at"] for r in ended)
        assert up.poll() is None  # the orchestrator stays, with no agent

        report = json.loads(dlorch("cost", "--json", env=env).stdout)
        assert set(ids) <= {row["key"] for row in report["rows"]}
        table = dlorch("cost", env=env).stdout
        assert all(i in table for i in ids)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except Exception:
            up.kill()


def test_scale_sets_the_policy_in_the_ledger_and_refuses_bad_values_in_one_line(home):
    env = cli_env()
    refused = dlorch("scale", "--provider", "ec2", "--max", "4", env=env, check=False)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "--cap-usd" in refused.stderr
    bad = dlorch("scale", "--cap-period", "soon", env=env, check=False)
    assert bad.returncode != 0 and "not a duration" in bad.stderr and "Traceback" not in bad.stderr
    shown = json.loads(dlorch("scale", "--provider", "ec2", "--max", "4", "--cap-usd", "25", "--cap-period", "12h",
                              "--instance-types", "g5.xlarge,g4dn.xlarge", "--on-demand", "--idle-minutes", "5",
                              "--launch-template", "dlorch-node", "--region", "us-east-1", "--json", env=env).stdout)
    scale = shown["scale"]
    assert (scale["provider"], scale["max_nodes"], scale["cap_usd"], scale["cap_period_s"], scale["spot"],
            scale["idle_s"]) == ("ec2", 4, 25.0, 43200.0, False, 300.0)
    assert scale["instance_types"] == ["g5.xlarge", "g4dn.xlarge"] and shown["launch_template"] == "dlorch-node"
    stored = json.loads((home / "ledger" / "fleet" / "config.json").read_text())
    assert stored["scale"] == scale  # what the running orchestrator reads at its next tick


def test_an_agent_just_spawned_is_listed_before_it_has_become_the_agent(tmp_path):
    """Between fork and exec a child's command line is still its parent's: the provider that started it
    lists it anyway (a busy machine once lost such a launch: its state file deleted, the agent untracked)."""
    import subprocess
    import sys

    from dlorch.orchestrator.fleet.local import LocalProvider
    from dlorch.orchestrator.fleet.model import LaunchRequest, Market

    provider = LocalProvider("exec-window", state_dir=tmp_path / "fleet", grace_s=1.0)
    # a child that is not (yet) `dlorch agent`: what /proc shows of one that has not exec'd
    provider._spawn = lambda node_id: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launched = provider.launch(LaunchRequest("local", Market.STATIC, 0.0, "n-early"))
    try:
        assert [i.id for i in provider.list()] == [launched.id]
        assert (tmp_path / "fleet" / "n-early.json").exists()
        assert [i.id for i in LocalProvider("exec-window", state_dir=tmp_path / "fleet").list()] == []  # not its child
    finally:
        provider.terminate([launched.id])
        provider._procs[int(launched.id[6:])].kill()
