"""Blockwise inference scaling: wall time and efficiency for N agents, per-block cost breakdown, queue throughput.

Real processes on this machine: `dlorch up`, N agents with one torch thread each, a zarr volume of
the ISBI stack predicted blockwise (one 512x512 slice per block) with a model trained once. Then a
near-no-op run: 1,000 blocks of 16x16 voxels, to measure what the queue and ledger cost per block.

    python bench/scaling.py [--agents 1 2] [--queue redis|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isbi2012-em"


class Cluster:
    def __init__(self, root: Path, agents: int, queue: str | None, label: str = "") -> None:
        self.home = root / f"home-{label}{agents}"
        self.env = {**os.environ, "DLORCH_HOME": str(self.home), "DLORCH_THREADS": "1", "DLORCH_HEARTBEAT_S": "2"}
        self.env.pop("DLORCH_STORE", None)
        if queue:
            self.env["DLORCH_QUEUE"] = queue
        else:
            self.env.pop("DLORCH_QUEUE", None)
        self.procs = [self._spawn("up")]
        self._wait(lambda: (self.home / "ledger" / "leader.json").exists())
        self.procs += [self._spawn("agent", "--node-id", f"n{i}", "--threads", "1") for i in range(agents)]
        self._wait(lambda: len(list((self.home / "ledger" / "nodes").glob("*.json"))) >= agents)

    def _spawn(self, *a: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", *a], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def _wait(pred, timeout=600.0):
        end = time.time() + timeout
        while time.time() < end:
            got = pred()
            if got:
                return got
            time.sleep(0.05)
        raise TimeoutError

    def predict(self, model: Path, volume: Path, block_voxels: int) -> dict:
        jid = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "predict", str(model), str(volume),
                              "-o", str(self.home / "out.zarr"), "--block-voxels", str(block_voxels), "--detach"],
                             env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        path = self.home / "ledger" / "jobs" / f"{jid}.json"
        return self._wait(lambda: (j := json.loads(path.read_text()))["status"] in ("succeeded", "failed") and j)

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def block_totals(home: Path, parent: dict) -> float:
    """Sum of the block attempts' own wall time (what the agents spent inside attempts)."""
    total = 0.0
    for i in range(parent["blocks"]["total"]):
        j = json.loads((home / "ledger" / "jobs" / f"{parent['id']}-b{i:05d}.json").read_text())
        total += sum(a["timings"].get("total_s", 0.0) for a in j["attempts"])
    return total


def measure(root: Path, n: int, queue: str | None, model: Path, volume: Path, block_voxels: int,
            label: str = "") -> dict:
    c = Cluster(root, n, queue, label)
    try:
        job = c.predict(model, volume, block_voxels)
    finally:
        c.close()
    b = job["blocks"]
    wall = b["finished_at"] - b["started_at"]  # the block phase: from the split to the last block
    per_block = {k: v / b["done"] for k, v in b["timings"].items()}
    inside = block_totals(c.home, job)
    return {"agents": n, "blocks": b["total"], "wall_s": wall, "end_to_end_s": b["finished_at"] - job["created_at"],
            "split_s": job["attempts"][0]["timings"].get("total_s", 0.0), "per_block_s": per_block,
            "overhead_per_block_ms": 1000 * max(0.0, n * wall - inside) / b["total"],
            "model_downloads": b["timings"].get("downloads", 0) + job["attempts"][0]["timings"].get("downloads", 0),
            "by_node": b["by_node"], "mvox_per_s": b["voxels_done"] / 1e6 / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--queue", choices=["redis", "sqlite"], default="redis" if shutil.which("redis-server") else "sqlite")
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--noop-blocks", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scaling.json")
    args = ap.parse_args()

    import zarr

    from dlorch.core.engine.hooks import NoHooks
    from dlorch.core.engine.segment import plan_segmentation, train_segmentation

    root = Path(tempfile.mkdtemp(prefix="dlorch-scaling-"))
    redis = None
    queue = None
    if args.queue == "redis":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--bind", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL)
        queue = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    try:
        image = np.load(DATA / "isbi2012_train.npz")["image"]
        strokes = np.load(DATA / "isbi2012_sparse_strokes.npz")["labels"]
        plan = plan_segmentation(image[:5], strokes[:5], epochs=1)
        model = train_segmentation(image[:5], strokes[:5], plan, workdir=root / "model", resume_from=None,
                                   hooks=NoHooks()).checkpoint
        vol = root / "isbi.zarr"
        zarr.create_array(str(vol), shape=image[: args.slices].shape, chunks=(1, 256, 256), dtype="uint8")[...] = \
            image[: args.slices]
        rows = [measure(root, n, queue, model, vol, 512 * 512) for n in args.agents]
        t1 = next((r["wall_s"] for r in rows if r["agents"] == 1), None)
        for r in rows:
            r["efficiency"] = t1 / (r["agents"] * r["wall_s"]) if t1 else None
        noop_vol = root / "noop.zarr"
        zarr.create_array(str(noop_vol), shape=(args.noop_blocks, 16, 16), chunks=(1, 16, 16), dtype="uint8")[...] = \
            np.random.default_rng(0).integers(0, 255, (args.noop_blocks, 16, 16), dtype=np.uint8)
        noop = measure(root, max(args.agents), queue, model, noop_vol, 256, label="noop")
        noop["tasks_per_s"] = noop["blocks"] / noop["wall_s"]
    finally:
        if redis:
            redis.kill()
    print(f"queue: {args.queue}; volume {image[: args.slices].shape} uint8, one 512x512 slice per block, "
          f"model {plan.filters} {plan.infer_roi}")
    hdr = ["agents", "blocks", "wall s", "efficiency", "Mvox/s", "compute", "read", "write", "model load",
           "overhead ms", "downloads"]
    print("".join(f"{h:>12}" for h in hdr))
    for r in rows:
        pb = r["per_block_s"]
        vals = [r["agents"], r["blocks"], r["wall_s"], r["efficiency"] or 0.0, r["mvox_per_s"], pb.get("compute_s", 0),
                pb.get("read_s", 0), pb.get("write_s", 0), pb.get("model_load_s", 0), r["overhead_per_block_ms"],
                r["model_downloads"]]
        print("".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in vals))
    print(f"near-no-op ({noop['blocks']} blocks of 16x16, {noop['agents']} agents): {noop['tasks_per_s']:.1f} tasks/s, "
          f"overhead {noop['overhead_per_block_ms']:.1f} ms per block (dispatch + claim + finish + ledger)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"queue": args.queue, "rows": rows, "noop": noop}, indent=1))
    print(f"wrote {args.out}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
