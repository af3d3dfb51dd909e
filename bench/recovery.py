"""Recovery after a hard kill: work redone per kill and time from kill to resumed training elsewhere.

Runs a real cluster (a redis-server of its own if one is installed, else the SQLite default):
`dlorch up`, two agents. For each of N jobs, a random moment after its first checkpoint, the agent
running it gets SIGKILL (and comes back as a fresh process). Measured from the ledger and the store:

* redone: seconds of training since the last accepted checkpoint (lost, done again), and in steps;
* kill -> claim: until another agent holds the job (lease expiry + queue);
* kill -> training: until the resumed attempt publishes its first checkpoint, less one epoch
  (when training had resumed).

    python bench/recovery.py [--kills 5] [--lease 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--lease", type=float, default=5.0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recovery.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="dlorch-recovery-"))
    home = tmp / "home"
    env = {**os.environ, "DLORCH_HOME": str(home), "DLORCH_LEASE_S": str(args.lease), "DLORCH_HEARTBEAT_S": "1",
           "DLORCH_THREADS": "1"}
    env.pop("DLORCH_STORE", None)
    procs: dict[str, subprocess.Popen] = {}
    redis = None
    if shutil.which("redis-server"):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--bind", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL)
        env["DLORCH_QUEUE"] = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    else:
        env.pop("DLORCH_QUEUE", None)

    def spawn(*a: str, name: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", *a], env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def job(jid: str) -> dict:
        return json.loads((home / "ledger" / "jobs" / f"{jid}.json").read_text())

    def wait(pred, timeout=300.0):
        end = time.time() + timeout
        while time.time() < end:
            got = pred()
            if got:
                return got
            time.sleep(0.05)
        raise TimeoutError("timed out")

    rows = []
    try:
        procs["up"] = spawn("up", name="up")
        wait(lambda: (home / "ledger" / "leader.json").exists())
        for n in ("a", "b"):
            procs[n] = spawn("agent", "--node-id", n, name=n)
        rs = np.random.default_rng(0)
        image = (rs.random((4, 96, 96)) * 60).astype(np.uint8)
        image[:, 30:60, 30:60] += 120
        labels = np.zeros_like(image)
        labels[:, 2:12, 2:12], labels[:, 40:50, 40:50] = 1, 2
        np.save(tmp / "img.npy", image)
        np.save(tmp / "lab.npy", labels)
        for k in range(args.kills):
            jid = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "segment", str(tmp / "img.npy"),
                                  "--labels", str(tmp / "lab.npy"), "-o", str(tmp / "o.tif"), "--epochs",
                                  str(args.epochs), "--detach"], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip()
            first = wait(lambda: (j := job(jid))["epochs_done"] >= 1 and j["status"] == "running" and j)
            ck = [p.stat().st_mtime for p in sorted((home / "jobs" / jid / "attempts").glob("*/ckpt/*.ckpt"))]
            epoch_s = (ck[-1] - ck[-2]) if len(ck) >= 2 else float(first["metrics"].get("train_seconds", 1.0))
            time.sleep(rng.uniform(0.2, 1.0) * max(epoch_s, 0.5))
            j = job(jid)
            victim = j["attempts"][-1]["node"]
            t_kill = time.time()
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            accepted = j["epochs_done"]
            last_ckpt = Path(j["checkpoint"]).stat().st_mtime
            procs[victim] = spawn("agent", "--node-id", victim, name=victim)
            claimed = wait(lambda: len((j2 := job(jid))["attempts"]) >= 2 and j2["attempts"][1]["started_at"] and j2)
            t_claim = claimed["attempts"][1]["started_at"]
            done = wait(lambda: (j3 := job(jid))["status"] == "succeeded" and j3, 600)
            second = [p.stat().st_mtime for p in (home / "jobs" / jid / "attempts" / "2" / "ckpt").glob("*.ckpt")]
            t_first_new = min(second) if second else float("nan")
            plan = done["plan"] or {}
            steps = plan.get("steps_per_epoch", 0)
            redone_s = t_kill - last_ckpt
            rows.append({"kill": k + 1, "accepted_epochs": accepted, "epoch_s": epoch_s, "redone_s": redone_s,
                         "redone_steps": round(redone_s / epoch_s * steps) if epoch_s else None,
                         "steps_per_epoch": steps, "kill_to_claim_s": t_claim - t_kill,
                         "kill_to_training_s": t_first_new - epoch_s - t_kill,
                         "epochs_total": done["epochs_done"], "attempts": len(done["attempts"])})
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis:
            redis.kill()
    print(f"queue: {'redis' if redis else 'sqlite'}, lease {args.lease:.0f} s, heartbeat 1 s, checkpoint every epoch")
    hdr = ["kill", "epoch s", "redone s", "redone steps", "steps/epoch", "kill->claim s", "kill->training s", "epochs"]
    print("".join(f"{h:>18}" for h in hdr))
    for r in rows:
        vals = [r["kill"], r["epoch_s"], r["redone_s"], r["redone_steps"], r["steps_per_epoch"],
                r["kill_to_claim_s"], r["kill_to_training_s"], r["epochs_total"]]
        print("".join(f"{v:>18.2f}" if isinstance(v, float) else f"{v!s:>18}" for v in vals))
    summary = {"max_redone_over_epoch": max(r["redone_s"] / r["epoch_s"] for r in rows),
               "max_kill_to_training_s": max(r["kill_to_training_s"] for r in rows),
               "median_kill_to_claim_s": statistics.median(r["kill_to_claim_s"] for r in rows),
               "target_resume_s": args.lease + 10}
    print(f"max redone / checkpoint interval: {summary['max_redone_over_epoch']:.2f} (target <= 1); "
          f"max kill->training: {summary['max_kill_to_training_s']:.1f} s (target <= {args.lease + 10:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary, "lease_s": args.lease}, indent=1))
    print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
