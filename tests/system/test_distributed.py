"""Real processes: `dlorch up`, two `dlorch agent`s, jobs submitted from a third process."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import cli_env, dlorch, job_json, spawn, wait_for


def _jobs(env):
    return {j["id"]: j for j in json.loads(dlorch("jobs", "--json", env=env).stdout)}


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except Exception:
            p.kill()


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
        epochs = {"A": 2, "B": 2, "C": 40}
        for name, prio in (("A", 0), ("B", 0), ("C", 5)):
            ids[name] = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / f"{name}.tif"),
                               "--epochs", str(epochs[name]), "--priority", str(prio), "--detach", env=env).stdout.strip()
        agents.append(spawn("agent", "--node-id", "agent-1", env=env, log=tmp_path / "a1.log"))
        wait_for(lambda: any(j["status"] != "queued" for j in _jobs(env).values()), 90, what="first claim")
        agents.append(spawn("agent", "--node-id", "agent-2", env=env, log=tmp_path / "a2.log"))
        final = wait_for(lambda: (js := _jobs(env)) and all(j["status"] == "succeeded" for j in js.values()) and js,
                         240, 1.0, what="all jobs to succeed")
        started = {n: final[i]["attempts"][0]["started_at"] for n, i in ids.items()}
        assert started["C"] < started["A"] < started["B"], started  # priority first, then FIFO
        assert {final[i]["node"] for i in ids.values()} <= {"agent-1", "agent-2"}
        assert final[ids["C"]]["node"] == "agent-1" and final[ids["A"]]["node"] == "agent-2"  # both agents worked
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
        _stop(*agents, up)


def test_sigterm_hands_back_and_another_agent_resumes(redis_server, home, tmp_path):
    env = cli_env(DLORCH_QUEUE=redis_server.url)
    img, lab = synthetic_pair(tmp_path)
    up = spawn("up", env=env, log=tmp_path / "up.log")
    a1 = a2 = None
    try:
        wait_for(lambda: _leader_up(home), 30, what="orchestrator")
        a1 = spawn("agent", "--node-id", "first", env=env, log=tmp_path / "a1.log")
        jid = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"),
                     "--epochs", "30", "--detach", env=env).stdout.strip()  # epochs of ~0.5 s: margin for the signal
        wait_for(lambda: job_json(jid, env)["epochs_done"] >= 2, 120, what="two epochs on the first agent")
        a2 = spawn("agent", "--node-id", "second", env=env, log=tmp_path / "a2.log")
        wait_for(lambda: any(n["id"] == "second" for n in json.loads(dlorch("nodes", "--json", env=env).stdout)),
                 60, what="second agent")
        a1.send_signal(signal.SIGTERM)
        assert a1.wait(timeout=120) == 0
        mid = job_json(jid, env)
        assert mid["status"] in ("queued", "running")  # requeued, progress kept
        assert mid["attempts"][0]["outcome"] == "handed_back" and mid["epochs_done"] >= 2
        job = wait_for(lambda: (j := job_json(jid, env))["status"] == "succeeded" and j, 180, what="completion")
        first, second = job["attempts"]
        assert (first["node"], second["node"]) == ("first", "second")
        assert second["epochs_start"] == first["epochs_done"] and second["resumed_from"] == _ckpt_path(home, first, jid)
        assert job["epochs_done"] == 30
        # The epochs actually trained, from the checkpoints each attempt wrote: 1..30, each exactly once.
        trained = sorted(int(p.stem.split("-")[1]) for p in (home / "jobs" / jid / "attempts").glob("*/ckpt/*.ckpt"))
        assert trained == list(range(1, 31))
        assert not (tmp_path / "o.tif").exists()  # detached: the result stays in the store
        assert job["output"] and Path(job["output"]).exists()
    finally:
        _stop(*(p for p in (a1, a2, up) if p))


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
