"""A local dlorch cluster of real processes for tests: `dlorch up`, agents, and fast ledger reads."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.conftest import cli_env, dlorch, spawn, wait_for


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
        return json.loads((self.home / "ledger" / "jobs" / f"{job_id}.json").read_text())

    def wait_job(self, job_id: str, pred, timeout: float = 300, what: str = "") -> dict:
        return wait_for(lambda: (j := self.job(job_id)) and pred(j) and j, timeout, 0.2,
                        what=what or f"job {job_id}")

    def node_log(self, node_id: str) -> str:
        return (self.tmp / f"{node_id}.log").read_text(errors="replace")

    def close(self) -> None:
        procs = [*self.agents.values(), *([self.service] if self.service else [])]
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
