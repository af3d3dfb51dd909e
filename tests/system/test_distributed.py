"""Real processes: `dlorch up`, two `dlorch agent`s, jobs submitted from a third process."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import (cli_env, dlorch, job_json, ledger_job, ledger_jobs, registered, spawn,
                                  stop_agents_then, wait_for)


def _jobs(env):
    return {j["id"]: j for j in json.loads(dlorch("jobs", "--json", env=env).stdout)}


def _leader_up(home: Path) -> bool:
    return (home / "ledger" / "leader.json").exists()


def test_fifo_with_priority_across_two_agents(home, tmp_path):
    env = cli_env()
    img, lab = synthetic_pair(tmp_path)
    up = spawn("up", env=env, log=tmp_path / "up.log")
    agents = []
    try:
        wait_for(lambda: _leader_up(home), 30, what="orchestrator")
        ids = {}
        # C, first by priority, is long: the second agent joins while the first still trains it (an agent
        # warms its engine up for seconds after registering, and three short jobs could all be done by then).
        # The second starts once the first has registered, so its start-up overlaps the first one's warm-up
        # and its first claim comes seconds after the first agent's: C outlasts that gap, not a whole start-up.
        epochs = {"A": 2, "B": 2, "C": 20}
        for name, prio in (("A", 0), ("B", 0), ("C", 5)):
            ids[name] = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / f"{name}.tif"),
                               "--epochs", str(epochs[name]), "--priority", str(prio), "--detach", env=env).stdout.strip()
        agents.append(spawn("agent", "--node-id", "agent-1", env=env, log=tmp_path / "a1.log"))
        wait_for(lambda: registered(home, "agent-1"), 90, what="the first agent to register")
        agents.append(spawn("agent", "--node-id", "agent-2", env=env, log=tmp_path / "a2.log"))
        wait_for(lambda: all(j["status"] == "succeeded" for j in ledger_jobs(home).values()), 240,
                 what="all jobs to succeed")
        final = _jobs(env)
        started = {n: final[i]["attempts"][0]["started_at"] for n, i in ids.items()}
        assert started["C"] < started["A"] < started["B"], started  # priority first, then FIFO
        assert {final[i]["node"] for i in ids.values()} <= {"agent-1", "agent-2"}
        assert final[ids["C"]]["node"] != final[ids["A"]]["node"]  # both agents worked, A beside the long C
        for name, i in ids.items():
            assert (final[i]["epochs_done"], final[i]["epochs_total"]) == (epochs[name], epochs[name])
        table = dlorch("jobs", env=env).stdout
        for name, i in ids.items():
            row = next(line for line in table.splitlines() if i in line)
            assert "succeeded" in row and f"{epochs[name]}/{epochs[name]}" in row and "agent-" in row
        nodes = json.loads(dlorch("nodes", "--json", env=env).stdout)
        assert {n["id"] for n in nodes} == {"agent-1", "agent-2"}
        from dlorch.core.engine.device import detect_runtime

        for n in nodes:
            assert n["cpus"] >= 1 and n["memory_bytes"] > 0 and n["pid"] > 0 and "heartbeat_at" in n
            assert n["precision"] == detect_runtime().precision  # the agents run on this machine
        listing = dlorch("nodes", env=env).stdout
        assert "precision" in listing.splitlines()[0]
        assert {"agent-1", "agent-2"} <= {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}
        assert all(({"bf16-mixed": "bf16", "32-true": "fp32"}[detect_runtime().precision] in line.split())
                   for line in listing.splitlines()[1:] if line.strip())
    finally:
        stop_agents_then(up, *agents)


EPOCHS = 16  # epochs of ~0.5 s (~2 s under load): margin for the signal, and for the second agent to take over


def test_sigterm_hands_back_and_another_agent_resumes(redis_server, home, tmp_path):
    env = cli_env(DLORCH_QUEUE=redis_server.url)
    img, lab = synthetic_pair(tmp_path)
    up = spawn("up", env=env, log=tmp_path / "up.log")
    a1 = a2 = None
    try:
        wait_for(lambda: _leader_up(home), 30, what="orchestrator")
        a1 = spawn("agent", "--node-id", "first", env=env, log=tmp_path / "a1.log")
        jid = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"),
                     "--epochs", str(EPOCHS), "--detach", env=env).stdout.strip()
        wait_for(lambda: ledger_job(home, jid)["status"] == "running", 120, what="the first agent's claim")
        # The second agent starts while the first trains: about as many epochs as it takes to register
        # (~5 on a loaded 2-core machine) are trained before the signal, a third of EPOCHS.
        a2 = spawn("agent", "--node-id", "second", env=env, log=tmp_path / "a2.log")
        wait_for(lambda: ledger_job(home, jid)["epochs_done"] >= 2 and registered(home, "second"), 120,
                 what="two epochs on the first agent and the second agent")
        a1.send_signal(signal.SIGTERM)
        assert a1.wait(timeout=120) == 0
        mid = job_json(jid, env)
        assert mid["status"] in ("queued", "running")  # requeued, progress kept
        assert mid["attempts"][0]["outcome"] == "handed_back" and 2 <= mid["epochs_done"] < EPOCHS
        wait_for(lambda: ledger_job(home, jid)["status"] == "succeeded", 180, what="completion")
        job = job_json(jid, env)
        first, second = job["attempts"]
        assert (first["node"], second["node"]) == ("first", "second")
        assert second["epochs_start"] == first["epochs_done"] and second["resumed_from"] == _ckpt_path(home, first, jid)
        assert job["epochs_done"] == EPOCHS
        # The epochs actually trained, from the checkpoints each attempt wrote: 1..EPOCHS, each exactly once.
        trained = sorted(int(p.stem.split("-")[1]) for p in (home / "jobs" / jid / "attempts").glob("*/ckpt/*.ckpt"))
        assert trained == list(range(1, EPOCHS + 1))
        assert not (tmp_path / "o.tif").exists()  # detached: the result stays in the store
        assert job["output"] and Path(job["output"]).exists()
    finally:
        stop_agents_then(up, *(p for p in (a1, a2) if p))


def _ckpt_path(home, attempt, jid):
    name = f"epoch-{attempt['epochs_done']:05d}.ckpt"
    return str(home / "jobs" / jid / "attempts" / str(attempt["token"]) / "ckpt" / name)


def test_segment_with_nothing_running_then_predict(home, tmp_path):
    env = cli_env()
    img, lab = synthetic_pair(tmp_path)
    cp = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "seg.tif"), "--epochs", "2", env=env)
    jid = cp.stdout.strip().splitlines()[-1]
    import tifffile

    seg = tifffile.imread(tmp_path / "seg.tif")
    assert seg.shape == np.load(img).shape and set(np.unique(seg)) <= {1, 2}
    job = job_json(jid, env)
    assert job["status"] == "succeeded" and job["model"]
    assert {"fetch_inputs_s", "train_s", "predict_s", "upload_output_s"} <= set(job["attempts"][0]["timings"])
    # segment and predict both follow the plan's test-time augmentation choice; a flag overrides it.
    tta = job["plan"]["tta"]
    assert any(r.startswith(f"test-time augmentation {'on' if tta else 'off'}") for r in job["plan"]["reasons"])
    dlorch("predict", jid, str(img), "-o", str(tmp_path / "again.npy"), env=env)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), seg)
    dlorch("predict", jid, str(img), "-o", str(tmp_path / "other.npy"), "--no-tta" if tta else "--tta", env=env)
    other = np.load(tmp_path / "other.npy")
    assert other.shape == seg.shape and (other != seg).any()
    assert "succeeded" in dlorch("logs", jid, env=env).stdout
