"""The local compute provider: ``dlorch agent`` processes on this machine, one per launched node.

Each launch starts ``python -m dlorch.orchestrator.cli agent --node-id <id>`` with the store, queue and
secret the orchestrator runs with, and writes a small state file ``<node id>.json`` (pid, process start
time, type, launch time) under ``<store>/fleet/<deployment>/`` (``~/.dlorch/fleet/<deployment>/`` for a
remote store), so that an orchestrator restarted while its agents are still ending lists them again.
A pid counts as that agent only while ``/proc/<pid>/cmdline`` still names its node id and its start time
matches: a pid reused by another process is never signalled.

Terminate sends SIGTERM (the agent checkpoints and hands its job back), then SIGKILL once ``grace_s``
has passed; the kill is also sent by the next ``list()`` after that, should this process restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dlorch.core.spec import check_id
from dlorch.orchestrator.fleet.model import Instance, InstanceState, LaunchRequest, Market

NAME = "local"


def state_dir_for(deployment: str, settings: Any = None) -> Path:
    """Where the state files of ``deployment``'s local agents live: the store's local root, else ``~/.dlorch``."""
    from dlorch.core.settings import default_home
    from dlorch.core.store import local_path

    root = local_path(settings.resolved_store()) if settings is not None else None
    return (root if root is not None else default_home()) / "fleet" / deployment


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if gone or unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


class LocalProvider:
    """Node agents as subprocesses of this machine (Market.STATIC, price 0).

    Args:
        deployment: the deployment name; only its agents are listed.
        settings: the orchestrator's ``Settings``; its store, queue and secret are given to the agents, and
            its store's local root holds the state files. None: the agents inherit this environment.
        state_dir: overrides where the state files are kept.
        grace_s: how long a terminated agent may take to hand its job back before SIGKILL.
        with_parent: the agents stop when this process ends (``--parent``), as local agents always do.
        agent_args: extra ``dlorch agent`` options (``--threads 1``); ``{node_id}`` in one is the node's id
            (``--spot-notices http://127.0.0.1:8000/{node_id}``).
        env: extra environment variables for the agents.
    """

    name = NAME

    def __init__(self, deployment: str, settings: Any = None, state_dir: Path | None = None, grace_s: float = 30.0,
                 with_parent: bool = True, agent_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.deployment = check_id("deployment", deployment)
        self.settings, self.grace_s, self.with_parent = settings, grace_s, with_parent
        self.dir = Path(state_dir) if state_dir is not None else state_dir_for(deployment, settings)
        self.agent_args = list(agent_args or [])
        self.extra_env = dict(env or {})
        self._procs: dict[int, subprocess.Popen] = {}  # the children this process started, reaped when they end
        self._lock = threading.Lock()

    # -- the Provider seam ---------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        """Start an agent registering as ``request.node_id``; a second launch of a live node id returns it again."""
        node_id = check_id("node", request.node_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(node_id)
        with self._lock:
            record = self._read(path)
            if record is not None and self._alive(record):
                return self._instance(record)
            proc = self._spawn(node_id)
            record = {"node_id": node_id, "pid": proc.pid, "start": _proc_start(proc.pid), "type": request.type,
                      "zone": request.zone, "launched_at": time.time(), "terminate_at": None}
            self._procs[proc.pid] = proc
            self._write(path, record)
        return self._instance(record)

    def terminate(self, instance_ids: list[str]) -> None:
        """SIGTERM each agent now (it hands its job back), SIGKILL those still alive ``grace_s`` later."""
        wanted = set(instance_ids)
        for path, record in self._records():
            if _instance_id(record) not in wanted or not self._alive(record):
                continue
            if record.get("terminate_at") is None:
                record["terminate_at"] = time.time()
                self._write(path, record)
            self._signal(record, signal.SIGTERM)
            if hasattr(signal, "SIGCONT"):  # a stopped agent (Ctrl-Z, a debugger) must wake to hand back
                self._signal(record, signal.SIGCONT)
            timer = threading.Timer(self.grace_s, self._kill_if_overdue, args=(path,))
            timer.daemon = True
            timer.start()

    def list(self) -> list[Instance]:
        """This deployment's live agents: RUNNING, or STOPPING after a terminate. Ended ones are forgotten."""
        self._reap()
        found = []
        for path, record in self._records():
            if not self._alive(record):
                path.unlink(missing_ok=True)
                continue
            self._kill_if_overdue(path, record)
            found.append(self._instance(record))
        return found

    # -- helpers -------------------------------------------------------------------------------------------

    def log_path(self, node_id: str) -> Path:
        """The agent's output (stdout and stderr)."""
        return self.dir / f"{node_id}.log"

    def _spawn(self, node_id: str) -> subprocess.Popen:
        env = {**os.environ, **self.extra_env}
        if self.settings is not None:
            env.update(DLORCH_STORE=self.settings.resolved_store(), DLORCH_QUEUE=self.settings.resolved_queue(),
                       DLORCH_SECRET=self.settings.resolved_secret().decode())
        cmd = [sys.executable, "-m", "dlorch.orchestrator.cli", "agent", "--node-id", node_id]
        if self.with_parent:
            cmd += ["--parent", str(os.getpid())]
        cmd += [a.replace("{node_id}", node_id) for a in self.agent_args]
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        with open(self.log_path(node_id), "ab") as log_file:
            return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, **kwargs)

    def _path(self, node_id: str) -> Path:
        return self.dir / f"{node_id}.json"

    def _records(self) -> list[tuple[Path, dict]]:
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("*.json")):
            record = self._read(path)
            if record is not None:
                out.append((path, record))
        return out

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
            return None
        return record

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def _reap(self) -> None:
        for pid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[pid]

    def _alive(self, record: dict) -> bool:
        """Whether the record's pid is still its agent (same node id on its command line, same start time)."""
        pid = record["pid"]
        proc = self._procs.get(pid)
        if proc is not None:
            if proc.poll() is None:
                return True  # this process's own child: its command line may not be the agent's yet (exec)
            del self._procs[pid]
            return False
        if not Path("/proc").is_dir():  # no procfs (macOS): existence of the pid is all there is to go by
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True
        cmd = _proc_cmdline(pid)
        if not cmd or "agent" not in cmd or "--node-id" not in cmd:
            return False
        i = cmd.index("--node-id")
        if i + 1 >= len(cmd) or cmd[i + 1] != record["node_id"]:
            return False
        start = _proc_start(pid)
        return start is not None and (record.get("start") is None or start == record["start"])

    def _signal(self, record: dict, sig: int) -> None:
        try:
            os.kill(record["pid"], sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_if_overdue(self, path: Path, record: dict | None = None) -> None:
        record = record if record is not None else self._read(path)
        if record is None or record.get("terminate_at") is None:
            return
        if time.time() - record["terminate_at"] >= self.grace_s and self._alive(record):
            self._signal(record, signal.SIGKILL)

    def _instance(self, record: dict) -> Instance:
        stopping = record.get("terminate_at") is not None
        return Instance(id=_instance_id(record), provider=NAME, type=record.get("type") or "local",
                        market=Market.STATIC, price_ceiling_usd_h=0.0,
                        state=InstanceState.STOPPING if stopping else InstanceState.RUNNING,
                        launched_at=float(record["launched_at"]), node_id=record["node_id"], zone=record.get("zone"))


def _instance_id(record: dict) -> str:
    return f"local-{record['pid']}"
