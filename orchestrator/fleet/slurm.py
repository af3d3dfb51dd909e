"""The Slurm compute provider: one batch job per node agent (sbatch), listed by squeue, ended by scancel.

A launch runs ``sbatch --parsable --job-name dlorch-<deployment>-<node id> --comment dlorch:deployment=<name>
SCRIPT <node id>`` with ``DLORCH_NODE_ID`` and ``DLORCH_DEPLOYMENT`` exported as well. The script
(``infra/slurm/dlorch-agent.sbatch``) runs ``dlorch agent --node-id "$1"`` and passes a SIGTERM of its
batch shell on to the agent, which hands its job back; or it is the agent itself (``exec dlorch agent``).
The script's own ``#SBATCH --signal=B:TERM@…`` warns it before the time limit.

Terminate signals the batch shell only (``scancel --signal=TERM --batch``: ``--full`` would also reach
``srun``, which ends its step at once on SIGTERM), then cancels the job ``grace_s`` later.

The job name carries the node id; the comment names the deployment exactly (a name prefix alone cannot
tell deployment ``a`` with node ``b-1`` from deployment ``a-b`` with node ``1``). Slurm machines are
``Market.STATIC``: the cluster's allocation, not paid per hour by dlorch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from dlorch.core.errors import BadInput
from dlorch.core.spec import check_id
from dlorch.orchestrator.fleet.model import (
    CapacityError,
    Instance,
    InstanceState,
    LaunchRequest,
    Market,
    ProviderError,
    QuotaError,
    ThrottledError,
)

NAME = "slurm"
FIELDS = "%i|%j|%T|%P|%V|%S|%k"  # job id, name, state, partition, submit time, start time, comment (last)
STATES = {"PENDING": InstanceState.PENDING, "CONFIGURING": InstanceState.PENDING,
          "REQUEUED": InstanceState.PENDING, "REQUEUE_HOLD": InstanceState.PENDING,
          "RESIZING": InstanceState.PENDING, "RUNNING": InstanceState.RUNNING,
          "SUSPENDED": InstanceState.RUNNING, "COMPLETING": InstanceState.STOPPING,
          "STAGE_OUT": InstanceState.STOPPING, "SIGNALING": InstanceState.STOPPING,
          "STOPPED": InstanceState.STOPPING}
FRESH_S = 10.0  # a job running shorter than this has not started its agent far enough to hold work
DEFAULT_TYPES = ("", "slurm", "default")  # a request type that names no partition

# sbatch's refusals -> what the policy may do about them (matched in its error text, lower case)
_QUOTA = ("qosmax", "assocmax", "submit limit", "job violates accounting/qos policy", "maxsubmit")
_CAPACITY = ("requested node configuration is not available", "node count specification invalid",
             "requested partition configuration not available")
_THROTTLE = ("temporarily unable to accept job", "socket timed out", "unable to contact slurm controller",
             "connection refused", "transient")
_CONFIG = ("invalid partition", "invalid account", "invalid qos")


def job_name(deployment: str, node_id: str) -> str:
    """The job name of a node's agent job: ``dlorch-<deployment>-<node id>``."""
    return f"dlorch-{deployment}-{node_id}"


def classify(stderr: str, doing: str) -> Exception:
    """The provider error sbatch's (or scancel's) complaint stands for, as one line."""
    text = " ".join(stderr.split())
    low = text.lower()
    line = f"Slurm {doing}: {text or 'failed without a message'}"
    if any(k in low for k in _CONFIG):
        return BadInput(f"{line}; check the partition (--partition or the instance type) with sinfo")
    if any(k in low for k in _QUOTA):
        return QuotaError(line)
    if any(k in low for k in _CAPACITY):
        return CapacityError(line)
    if any(k in low for k in _THROTTLE):
        return ThrottledError(line)
    return ProviderError(line)


class SlurmProvider:
    """Agent jobs on a Slurm cluster, submitted from this (login) machine.

    Args:
        deployment: the deployment name, part of every job name and the job comment.
        script: the batch script that runs ``dlorch agent --node-id "$1"``.
        partition: the partition for requests whose type names none; None: the cluster's default.
        sbatch_args: more sbatch options (``--gres=gpu:1``, ``--time=4:00:00``, ``--account=…``).
        log_dir: where the jobs write their output (``<job name>-<job id>.out``); None: Slurm's default.
        grace_s: how long a terminated agent may take to hand its job back before ``scancel`` ends the job.
        env: the environment of the Slurm commands (``SLURM_CONF`` …); None: this process's.
    """

    name = NAME

    def __init__(self, deployment: str, script: str | os.PathLike, partition: str | None = None,
                 sbatch_args: list[str] | None = None, log_dir: str | os.PathLike | None = None,
                 grace_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.deployment = check_id("deployment", deployment)
        self.script = Path(script)
        if not self.script.is_file():
            raise BadInput(f"Slurm job script {self.script} does not exist; give the agent's batch script "
                           "(infra/ has one)")
        self.partition, self.grace_s = partition, grace_s
        self.sbatch_args = list(sbatch_args or [])
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.env = dict(env) if env is not None else None
        self.comment = f"dlorch:deployment={self.deployment}"
        self._terminating: dict[str, float] = {}  # job id -> when SIGTERM was sent (this process only)
        self._lock = threading.Lock()

    # -- the Provider seam ---------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        """sbatch the agent job; a live job of the same node id is returned instead of a second one."""
        node_id = check_id("node", request.node_id)
        name = job_name(self.deployment, node_id)
        existing = [i for i in self._squeue(["--name", name]) if i.node_id == node_id]
        if existing:
            return existing[0]
        out = self._run(self.sbatch_command(request), f"sbatch of {name}")
        job_id = out.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
        if not job_id.isdigit():
            raise ProviderError(f"Slurm sbatch of {name}: unexpected answer {out.strip()[:80]!r}")
        for instance in self._squeue(["--jobs", job_id]):
            return instance
        return Instance(id=job_id, provider=NAME, type=self._partition(request) or "", market=Market.STATIC,
                        price_ceiling_usd_h=0.0, state=InstanceState.PENDING, launched_at=time.time(),
                        node_id=node_id, zone=None)

    def terminate(self, instance_ids: list[str]) -> None:
        """SIGTERM the agents (they hand their jobs back), then ``scancel`` the jobs ``grace_s`` later."""
        ours = {i.id: i for i in self.list()}
        ids = [i for i in dict.fromkeys(instance_ids) if i in ours]
        # A job not started yet holds nothing: cancel it outright. Nor does one started moments ago: its agent
        # is still starting, and a signal sent before slurmd has started the batch script is lost.
        now = time.time()
        waiting = [i for i in ids if ours[i].state is InstanceState.PENDING or now - ours[i].launched_at < FRESH_S]
        if waiting:
            self._run(self.scancel_command(waiting), f"scancel of {', '.join(waiting)}")
        ids = [i for i in ids if i not in waiting]
        if not ids:
            return
        with self._lock:
            for job_id in ids:
                self._terminating.setdefault(job_id, now)
        self._run(self.scancel_command(ids, signal="TERM"), f"scancel --signal=TERM of {', '.join(ids)}")
        timer = threading.Timer(self.grace_s, self._cancel_overdue)
        timer.daemon = True
        timer.start()

    def list(self) -> list[Instance]:
        """This deployment's jobs that have not ended (pending, running, completing)."""
        self._cancel_overdue()
        return self._squeue([])

    # -- command lines (public so that they can be checked without a cluster) -------------------------------

    def sbatch_command(self, request: LaunchRequest) -> list[str]:
        """The sbatch command line that starts ``request``'s agent job."""
        name = job_name(self.deployment, request.node_id)
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--comment={self.comment}",
               f"--export=ALL,DLORCH_NODE_ID={request.node_id},DLORCH_DEPLOYMENT={self.deployment}"]
        partition = self._partition(request)
        if partition:
            cmd.append(f"--partition={partition}")
        if self.log_dir is not None:
            cmd.append(f"--output={self.log_dir / '%x-%j.out'}")
        return [*cmd, *self.sbatch_args, str(self.script), request.node_id]

    def squeue_command(self, extra: list[str]) -> list[str]:
        """The squeue command line listing this user's jobs (``extra``: ``--name``/``--jobs`` filters)."""
        return ["squeue", "--me", "--noheader", f"--format={FIELDS}", *extra]

    @staticmethod
    def scancel_command(job_ids: list[str], signal: str | None = None) -> list[str]:
        """scancel of ``job_ids``; with ``signal``, only that signal, to the batch shell (which passes it on)."""
        return ["scancel", *([f"--signal={signal}", "--batch"] if signal else []), *job_ids]

    def parse(self, squeue_out: str) -> list[Instance]:
        """squeue's lines (in ``FIELDS``) -> this deployment's instances; other jobs are skipped."""
        prefix = job_name(self.deployment, "")
        found = []
        for line in squeue_out.splitlines():
            parts = line.strip().split("|", 6)
            if len(parts) != 7:
                continue
            job_id, name, state, partition, submitted, started, comment = parts
            if comment.strip() != self.comment or not name.startswith(prefix):
                continue
            state_ = STATES.get(state.strip().upper(), InstanceState.TERMINATED)
            if state_ is InstanceState.TERMINATED:
                continue
            if job_id in self._terminating and state_ is not InstanceState.PENDING:
                state_ = InstanceState.STOPPING
            started_at = _epoch(started) if state_ is not InstanceState.PENDING else None
            found.append(Instance(id=job_id.strip(), provider=NAME, type=partition.strip(), market=Market.STATIC,
                                  price_ceiling_usd_h=0.0, state=state_,
                                  launched_at=started_at or _epoch(submitted) or 0.0,
                                  node_id=name[len(prefix):], zone=None))
        return found

    # -- helpers -------------------------------------------------------------------------------------------

    def _partition(self, request: LaunchRequest) -> str | None:
        return self.partition if request.type in DEFAULT_TYPES else request.type

    def _squeue(self, extra: list[str]) -> list[Instance]:
        return self.parse(self._run(self.squeue_command(extra), "squeue"))

    def _cancel_overdue(self) -> None:
        now = time.time()
        with self._lock:
            due = [j for j, at in self._terminating.items() if now - at >= self.grace_s]
            for job_id in due:
                del self._terminating[job_id]
        if due:
            try:
                self._run(self.scancel_command(due), f"scancel of {', '.join(due)}")
            except ProviderError:
                with self._lock:  # try again on the next list
                    for job_id in due:
                        self._terminating.setdefault(job_id, now - self.grace_s)

    def _run(self, cmd: list[str], doing: str) -> str:
        exe = shutil.which(cmd[0], path=(self.env or os.environ).get("PATH"))
        if exe is None:
            raise BadInput(f"Slurm {doing}: {cmd[0]} is not on PATH; run dlorch on a Slurm login node "
                           "(or install slurm-client)")
        env = {**(self.env if self.env is not None else os.environ), "SLURM_TIME_FORMAT": "%s"}
        try:
            cp = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=60, env=env)
        except subprocess.TimeoutExpired:
            raise ThrottledError(f"Slurm {doing}: no answer within 60 s") from None
        if cp.returncode != 0:
            raise classify(cp.stderr or cp.stdout, doing)
        return cp.stdout


def _epoch(text: str) -> float | None:
    """A squeue time printed with ``SLURM_TIME_FORMAT=%s`` (epoch seconds); None for ``N/A`` and the like."""
    text = text.strip()
    return float(text) if text.isdigit() else None
