"""infra/ for machines dlorch does not launch: the Slurm batch script under real signals (a stand-in Slurm, and
the real agent), the systemd unit of a lab PC's agent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, synthetic_pair
from tests.system.harness import Cluster, wait_for

INFRA = REPO / "infra"
SBATCH = INFRA / "slurm" / "dlorch-agent.sbatch"
UNIT = INFRA / "systemd" / "dlorch-agent.service"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)




# -- the Slurm batch script --------------------------------------------------------------------------------------

def _slurm_bin(tmp: Path) -> tuple[Path, Path]:
    """Slurm's commands as the batch script meets them inside a job, recording their calls.

    ``srun`` runs its command as the step's task and, as the real one does, ends it with SIGKILL on SIGTERM
    ("forcing job termination"); ``squeue --steps`` lists step 0, ``squeue --format=%L`` says $TIME_LEFT;
    ``scancel --signal=TERM JOB.0`` signals the task; ``scontrol`` only records.
    """
    bin_dir, calls, task = tmp / "slurm-bin", tmp / "slurm-calls", tmp / "step-task.pid"
    bin_dir.mkdir()
    _fake(bin_dir, "srun", f"""echo "srun $*" >>{calls}
while [ "${{1#-}}" != "$1" ]; do shift; done
"$@" &
task=$!
echo $task >{task}
trap 'echo "srun: forcing job termination" >>{calls}; kill -KILL $task' TERM
while :; do wait $task; status=$?; kill -0 $task 2>/dev/null || exit $status; done
""")
    _fake(bin_dir, "squeue", f"""echo "squeue $*" >>{calls}
case "$*" in
  *--steps*) echo "$SLURM_JOB_ID.0"; echo "$SLURM_JOB_ID.batch" ;;
  *--format=%L*) echo "  $TIME_LEFT" ;;
esac
""")
    _fake(bin_dir, "scancel", f"""echo "scancel $*" >>{calls}
[ "$*" = "--signal=TERM $SLURM_JOB_ID.0" ] && kill -TERM "$(cat {task})"
exit 0
""")
    _fake(bin_dir, "scontrol", f'echo "scontrol $*" >>{calls}\n')
    return bin_dir, calls


def _sbatch_env(bin_dir: Path, tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "HOME": str(tmp), "TIME_LEFT": "1:58", **extra}
    return env


def test_sbatch_header_asks_for_the_warning_signal_and_requeue():
    head = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:TERM@120" in head and "#SBATCH --requeue" in head


def _stand_in_agent(bin_dir: Path, calls: Path, started: Path, on_term: int) -> None:
    """A `dlorch` that exits as `dlorch agent --handed-back-status 75` does on SIGTERM: 75 with work handed back,
    0 with nothing in hand."""
    _fake(bin_dir, "dlorch", f"""echo "dlorch $*" >>{calls}
trap 'echo "agent got TERM" >>{calls}; sleep 1; exit {on_term}' TERM
touch {started}
while :; do sleep 0.1; done
""")


@pytest.mark.parametrize("on_term, time_left, requeued", [
    (75, "1:58", True),  # the time limit's warning, work handed back: requeued
    (0, "1:58", False),  # the warning, nothing in hand: the job ends
    (75, "3:59:00", False),  # scancel --signal=TERM --batch hours before the limit: an end, not a requeue
    (75, "UNLIMITED", False),  # no time limit: no warning to requeue for
])
def test_sbatch_passes_a_signal_to_the_agent_and_requeues_only_for_the_time_limit_with_work_handed_back(
        tmp_path, on_term, time_left, requeued):
    bin_dir, calls = _slurm_bin(tmp_path)
    started = tmp_path / "agent-started"
    _stand_in_agent(bin_dir, calls, started, on_term)
    proc = subprocess.Popen(["bash", str(SBATCH), "n-7"], env=_sbatch_env(bin_dir, tmp_path, TIME_LEFT=time_left),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(started.exists, 20, 0.05, what="the agent to start")
    proc.send_signal(signal.SIGTERM)  # what Slurm sends the batch shell 120 s before the time limit (B:TERM)
    output, _ = proc.communicate(timeout=30)
    log = calls.read_text()
    assert "dlorch agent --node-id n-7 --handed-back-status 75" in log
    assert "scancel --signal=TERM 4242.0" in log and "agent got TERM" in log
    assert "forcing job termination" not in log  # srun itself was left alone: it would have killed the agent
    assert ("scontrol requeue 4242" in log) is requeued, output
    assert proc.returncode == 0, output


def test_sbatch_ends_without_requeue_when_the_agent_was_signalled_through_its_step(tmp_path):
    """`scancel --signal=TERM JOB` (a user, or dlorch retiring the node) reaches the step, not the shell: the agent
    hands its work back and the job ends, not requeued."""
    bin_dir, calls = _slurm_bin(tmp_path)
    started = tmp_path / "agent-started"
    _stand_in_agent(bin_dir, calls, started, 75)
    proc = subprocess.Popen(["bash", str(SBATCH), "n-8"], env=_sbatch_env(bin_dir, tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(started.exists, 20, 0.05, what="the agent to start")
    os.kill(int((tmp_path / "step-task.pid").read_text()), signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert "agent got TERM" in calls.read_text() and "requeue" not in calls.read_text()
    assert proc.returncode == 0 and "handed its work back and ended" in output, output


def test_sbatch_does_not_requeue_an_agent_that_ended_by_itself(tmp_path):
    bin_dir, calls = _slurm_bin(tmp_path)
    _fake(bin_dir, "dlorch", "exit 3\n")  # e.g. a wrong setting: one line and a non-zero status
    cp = subprocess.run(["bash", str(SBATCH)], env=_sbatch_env(bin_dir, tmp_path, DLORCH_NODE_ID="from-env"),
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 3
    log = calls.read_text()
    assert "--node-id from-env" in log and "requeue" not in log


def test_sbatch_refuses_an_env_file_others_can_read(tmp_path):
    bin_dir, calls = _slurm_bin(tmp_path)
    env_file = tmp_path / "agent.env"
    env_file.write_text("DLORCH_SECRET=s3cret\n")
    env_file.chmod(0o644)
    cp = subprocess.run(["bash", str(SBATCH)], env=_sbatch_env(bin_dir, tmp_path, DLORCH_ENV_FILE=str(env_file)),
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2 and "chmod 600" in cp.stdout + cp.stderr
    assert not calls.exists()  # no agent started


@pytest.mark.slow
def test_sbatch_with_the_real_agent_hands_a_training_job_back_and_requeues(home, tmp_path):
    """The real `dlorch agent` under the batch script: SIGTERM while it trains -> hand-back, exit 75, requeue.
    (With nothing in hand it exits 0, see tests/unit/test_agent_work_left.py, and the script ends.)"""
    bin_dir, calls = _slurm_bin(tmp_path)
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        env = {**c.env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               "SLURM_JOB_ID": "77", "HOME": str(tmp_path), "TIME_LEFT": "1:59"}
        with open(tmp_path / "sbatch.log", "w") as out:
            batch = subprocess.Popen(["bash", str(SBATCH), "slurm-node"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "60")
            c.wait_job(jid, lambda j: j["status"] == "running", 180, what="the agent under the batch script to claim")
            batch.send_signal(signal.SIGTERM)  # Slurm's warning signal to the batch shell
            assert batch.wait(timeout=120) == 0
        finally:
            if batch.poll() is None:
                batch.kill()
        job = c.job(jid)
        assert job["attempts"][0]["outcome"] == "handed_back" and job["status"] == "queued"
        log = (tmp_path / "sbatch.log").read_text()
        assert "scontrol requeue 77" in calls.read_text(), log
        assert "work remains at the time limit (119s left), job 77 requeued" in log


# -- systemd ---------------------------------------------------------------------------------------------------

def test_the_systemd_unit_verifies_cleanly(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = UNIT.read_text()
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert fields["Restart"] == "on-failure" and fields["KillSignal"] == "SIGTERM"
    assert int(fields["TimeoutStopSec"]) >= 120 and fields["User"] != "root"
    assert fields["EnvironmentFile"].startswith("/etc/dlorch/") and "DLORCH_SECRET" not in text.split("[Unit]")[1]
    assert fields["NoNewPrivileges"] == "yes" and fields["ProtectSystem"] == "strict"
    # verify checks that ExecStart's program exists: point it at this environment's dlorch
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/dlorch/bin/dlorch", str(Path(sys.executable).with_name("dlorch"))))
    cp = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and not cp.stderr.strip(), cp.stderr  # a directive it cannot parse is a warning
