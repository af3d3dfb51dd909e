"""Same command, same answer: `dlorch segment` on ISBI 2012 run N times; mean IoU of each run and the spread.

Every run is the user's command on the embedded default (a fresh DLORCH_HOME each time: its own
orchestrator and agent), trained on the shared ~50,000 stroke pixels of slices 0-4 and scored on
slices 5-29 against the dense labels. The plan's epochs, steps per epoch and seed are printed per
run, so a spread can be traced to the plan or to training. Target: spread (max - min) <= 0.01.

    python bench/repeatability.py [--runs 2] [--time-budget S] [--json PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isbi2012-em"
CLASSES = {1: "membrane", 2: "cell"}
EVAL_SLICES = slice(5, 30)


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the classes of their IoU."""
    ious = []
    for c in CLASSES:
        inter = np.logical_and(pred == c, truth == c).sum()
        union = np.logical_or(pred == c, truth == c).sum()
        ious.append(inter / union if union else np.nan)
    return float(np.nanmean(ious))


def one_run(image: Path, labels: Path, work: Path, time_budget: float | None) -> dict:
    """One `dlorch segment` on a fresh embedded home: its output scored, its plan's schedule."""
    home = work / "home"
    out = work / "seg.npy"
    env = {**os.environ, "DLORCH_HOME": str(home)}
    for v in ("DLORCH_STORE", "DLORCH_QUEUE"):
        env.pop(v, None)
    cmd = [sys.executable, "-m", "dlorch.orchestrator.cli", "segment", str(image), "--labels", str(labels),
           "--out", str(out)]
    if time_budget:
        cmd += ["--time-budget", str(time_budget)]
    t0 = time.perf_counter()
    cp = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if cp.returncode != 0:
        raise SystemExit(f"dlorch segment failed ({cp.returncode}): {cp.stderr.strip().splitlines()[-1:]}")
    truth = np.load(DATA / "isbi2012_train.npz")["labels"]
    pred = np.load(out)
    jobs = sorted((home / "ledger" / "jobs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    job = json.loads(jobs[-1].read_text()) if jobs else {}
    plan = job.get("plan") or {}
    return {"mean_iou": mean_iou(pred[EVAL_SLICES], truth[EVAL_SLICES]), "wall_s": wall,
            "epochs": plan.get("epochs"), "steps_per_epoch": plan.get("steps_per_epoch"),
            "step_seconds": plan.get("step_seconds"), "seed": plan.get("seed"),
            "epochs_done": job.get("epochs_done")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=None, help="passed to dlorch segment (default: its own)")
    ap.add_argument("--json", type=Path, default=None, help="write the runs and the spread here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep each run's home (ledger, models, output) in DIR/runN instead of a temporary folder")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dlorch-repeat-") as tmp:
        tmp = Path(tmp)
        if args.keep:
            if args.keep.exists() and any(args.keep.iterdir()):
                raise SystemExit(f"--keep {args.keep}: the folder is not empty; name a new or empty one")
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        image, labels = tmp / "image.npy", tmp / "labels.npy"
        np.save(image, np.load(DATA / "isbi2012_train.npz")["image"])
        np.save(labels, np.load(DATA / "isbi2012_sparse_strokes.npz")["labels"])
        for i in range(args.runs):
            work = tmp / f"run{i}"
            work.mkdir()
            r = one_run(image, labels, work, args.time_budget)
            runs.append(r)
            print(f"run {i + 1}: mean IoU {r['mean_iou']:.4f}  epochs {r['epochs_done']}/{r['epochs']} x "
                  f"{r['steps_per_epoch']} steps  step {r['step_seconds']} s  seed {r['seed']}  "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    ious = [r["mean_iou"] for r in runs]
    spread = max(ious) - min(ious)
    print(f"\n{'runs':<10}{len(runs)}\n{'mean IoU':<10}" + " ".join(f"{v:.4f}" for v in ious))
    print(f"{'spread':<10}{spread:.4f}   (target <= 0.01)")
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "runs": runs, "mean_iou": ious, "spread": spread}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
