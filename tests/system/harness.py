"""Real processes for the system tests: a redis-server, the `dlorch` CLI, a local cluster (`dlorch up`, agents)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


class RedisServer:
    """A redis-server process this test owns, so it can kill it (and restart it empty)."""

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH: apt-get install -y redis-server (`make test` does it)")
        self.exe, self.tmp, self.port = exe, tmp, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.setdefault("DLORCH_HEARTBEAT_S", "1")
    env.setdefault("DLORCH_THREADS", "1")
    return env


def dlorch(*args: str, env: dict | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``dlorch`` CLI in a subprocess."""
    cp = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", *args], env=env or cli_env(),
                        capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"dlorch {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def spawn(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a long-running ``dlorch`` process (service or agent)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", *args], env=env or cli_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def job_json(job_id: str, env: dict | None = None) -> dict:
    return json.loads(dlorch("status", job_id, "--json", env=env).stdout)


def ledger_job(home: Path, job_id: str) -> dict:
    """A job's ledger record, read directly: polling through the CLI costs a process (~1 CPU second) per look,
    taken from the agents under test on a 2-core machine. Assertions on what the CLI shows still go through it."""
    return json.loads((home / "ledger" / "jobs" / f"{job_id}.json").read_text())


def ledger_jobs(home: Path) -> dict[str, dict]:
    """Every job's ledger record by id (see ``ledger_job``)."""
    return {p.stem: json.loads(p.read_text()) for p in (home / "ledger" / "jobs").glob("*.json")}


def registered(home: Path, node_id: str) -> bool:
    """Whether node ``node_id`` has registered (the orchestrator wrote its ledger record)."""
    return (home / "ledger" / "nodes" / f"{node_id}.json").exists()


def wait_for(pred, timeout: float = 120, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Cluster:
    """One orchestrator and any number of agents sharing a state directory (and maybe Redis)."""

    def __init__(self, tmp: Path, home: Path, **env: str) -> None:
        self.tmp, self.home = tmp, home
        self.env = cli_env(**{"DLORCH_LEASE_S": "5", "DLORCH_HEARTBEAT_S": "1", **env})
        self.service: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Cluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> None:
        self.service = spawn("up", env=self.env, log=self.tmp / "up.log")
        wait_for(lambda: (self.home / "ledger" / "leader.json").exists(), 30, what="orchestrator")

    def agent(self, node_id: str, *args: str) -> subprocess.Popen:
        proc = spawn("agent", "--node-id", node_id, *args, env=self.env, log=self.tmp / f"{node_id}.log")
        self.agents[node_id] = proc
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return dlorch(*args, env=self.env, check=check)

    def submit(self, *args: str) -> str:
        return self.cli(*args, "--detach").stdout.strip()

    def job(self, job_id: str) -> dict:
        """The ledger record, read directly (polling through the CLI would cost a process per look)."""
        return ledger_job(self.home, job_id)

    def wait_job(self, job_id: str, pred, timeout: float = 300, what: str = "") -> dict:
        return wait_for(lambda: (j := self.job(job_id)) and pred(j) and j, timeout, 0.2,
                        what=what or f"job {job_id}")

    def node_log(self, node_id: str) -> str:
        return (self.tmp / f"{node_id}.log").read_text(errors="replace")

    def close(self) -> None:
        stop_agents_then(self.service, *self.agents.values())


def terminate(*procs: subprocess.Popen) -> None:
    """SIGTERM (after SIGCONT, in case a test froze one) every process still running, then wait for all of them;
    SIGKILL one that is not gone within 60 s."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_agents_then(service: subprocess.Popen | None, *agents: subprocess.Popen) -> None:
    """Stop the agents, then the orchestrator: an agent says goodbye on its way out, and with the orchestrator
    already gone it would wait out that message's 5 s timeout."""
    terminate(*agents)
    if service is not None:
        terminate(service)
