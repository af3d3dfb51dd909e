"""An agent ends with what started it, and a signal ends every wait: real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from tests.system.harness import Cluster, cli_env, ledger_jobs, spawn, wait_for


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _registered(home: Path) -> bool:
    nodes = home / "ledger" / "nodes"
    return nodes.exists() and any(nodes.glob("*.json"))


def test_a_local_agent_ends_with_the_command_that_started_it_even_on_sigkill(home, tmp_path):
    up = spawn("up", "--agents", "1", env=cli_env(), log=tmp_path / "up.log")
    try:
        wait_for(lambda: _registered(home), 120, what="the local agent to register")
        agents = [int(p) for p in subprocess.run(["pgrep", "-P", str(up.pid)], capture_output=True,
                                                 text=True).stdout.split()]
        assert agents
        up.send_signal(signal.SIGKILL)  # no chance to drain or terminate anything
        up.wait()
        wait_for(lambda: not any(_running(p) for p in agents), 30, 0.2,
                 what="the orphaned local agent to stop")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_an_agent_waiting_to_report_to_a_gone_orchestrator_stops_promptly_on_sigterm(home, tmp_path, model):
    image = tmp_path / "big.npy"
    np.save(image, np.random.default_rng(0).integers(0, 255, (12, 256, 256), dtype=np.uint8))
    with Cluster(tmp_path, home) as c:
        agent = c.agent("a1")
        wait_for(lambda: _registered(home), 120, what="the agent to register")
        # Submitted by a process the test does not wait for: the attempt (~3 s) could end while the CLI is
        # still exiting, and a claim looked for only after that is never seen.
        submit = spawn("predict", str(model), str(image), "-o", str(tmp_path / "p.tif"), "--detach", env=c.env)
        jid = wait_for(lambda: next((i for i, j in ledger_jobs(home).items() if j["status"] == "running"), None),
                       120, 0.05, what="the claim")
        # The ledger records the claim before the agent hears of it: the kill waits for the agent to start.
        wait_for(lambda: f"running {jid} attempt 1" in c.node_log("a1"), 60, 0.05, what="the attempt to start")
        c.service.send_signal(signal.SIGKILL)  # the orchestrator is gone before the attempt ends
        assert submit.wait(timeout=60) == 0
        c.service.wait()
        # The attempt's log is uploaded right before its finish report: from then on the agent waits to be heard.
        wait_for(lambda: (home / "jobs" / jid / "attempts" / "1" / "log.txt").exists(), 120,
                 what="the attempt to end")
        assert c.job(jid)["status"] == "running"  # nobody recorded the end: the agent is retrying its report
        time.sleep(1)
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the agent kept waiting for an orchestrator after SIGTERM") from None
        assert time.monotonic() - t0 < 20
