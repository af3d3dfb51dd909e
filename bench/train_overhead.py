"""Epoch time of the same model and data under dlorch vs a bare Lightning script; prints a table, writes JSON.

dlorch side: `dlorch train segment` on the embedded default (orchestrator + one agent subprocess);
an epoch's time is the interval between the publication of consecutive epoch checkpoints in the
store, so it includes everything dlorch adds per epoch on the training thread (the checkpoint write; the
upload and the progress report run on a background publisher).
Bare side: the engine's own module and data, `pl.Trainer.fit`, no checkpoints, no hooks; an epoch's time
is the interval between consecutive epoch ends. The first epoch (warm-up) is left out of both.

The two sides take turns, each in a fresh process, in the order dlorch, bare, bare, dlorch, ... (one
pair per round): a VM's speed drifts by a few percent over minutes, and one side always run first
would carry that drift into the ratio. Each round's ratio is that of its two medians; the figure is
their geometric mean (the pairs cancel a drift that is linear over the rounds).

    python bench/train_overhead.py [--epochs 4] [--slices 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isbi2012-em"


def bare_epochs(image, labels, plan) -> list[float]:
    """Epoch end times of a bare Lightning run of the engine's module on the same data."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from dlorch.core.engine.device import apply_threads, detect_runtime
    from dlorch.core.engine.inputs import check_labels
    from dlorch.core.engine.segment.holdout import split_strokes
    from dlorch.core.engine.segment.intensity import normalize
    from dlorch.core.engine.segment.module import SegmentationModule
    from dlorch.core.engine.segment.sampling import TrainPatches, ValTiles

    stack, lab, _ = check_labels(image, labels)
    runtime = detect_runtime()
    apply_threads(runtime)
    pl.seed_everything(plan.seed, verbose=False)
    norm = normalize(stack)
    split = split_strokes(lab, plan.val_fraction, seed=plan.seed)
    patch = tuple(plan.patch_size)
    train = TrainPatches(norm, split.train, patch, plan.batch_size, plan.steps_per_epoch, plan.seed)
    val = ValTiles(norm, split.val, patch, plan.batch_size, plan.seed)
    ends: list[float] = []

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            train.epoch = trainer.current_epoch

        def on_validation_epoch_end(self, trainer, module):
            ends.append(time.perf_counter())

    trainer = pl.Trainer(accelerator=runtime.accelerator, devices=1, precision=runtime.precision,
                         max_epochs=plan.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[Clock()])
    trainer.fit(SegmentationModule(plan), DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    return ends


def dlorch_epochs(image_path: Path, labels_path: Path, epochs: int, home: Path) -> tuple[list[float], dict]:
    """Epoch checkpoint publication times of a `dlorch train segment` job, and its ledger record."""
    env = {**os.environ, "DLORCH_HOME": str(home)}
    for v in ("DLORCH_STORE", "DLORCH_QUEUE"):
        env.pop(v, None)
    cp = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "train", "segment", str(image_path),
                         "--labels", str(labels_path), "--epochs", str(epochs)],
                        env=env, capture_output=True, text=True, check=True)
    job_id = cp.stdout.strip().splitlines()[-1]
    job = json.loads((home / "ledger" / "jobs" / f"{job_id}.json").read_text())
    ckpts = sorted((home / "jobs" / job_id / "attempts").glob("*/ckpt/*.ckpt"))
    # Checkpoints are published in the background and a newer one supersedes one not yet sent, so an
    # epoch may be missing: its interval is spread over the epochs between two published ones.
    ends, last = [], None
    for p in ckpts:
        epoch, t = int(p.stem.split("-")[-1]), p.stat().st_mtime
        if last is not None:
            step = (t - last[1]) / max(1, epoch - last[0])
            ends += [ends[-1] + step * (i + 1) for i in range(epoch - last[0])]
        else:
            ends.append(t)
        last = (epoch, t)
    return ends, job


def bare_side(image_path: Path, labels_path: Path, out: Path, epochs: int) -> None:
    """The bare side in this (fresh) process: its epoch end times and plan written to ``out``."""
    from dlorch.core.engine.segment import plan_segmentation

    image, labels = np.load(image_path), np.load(labels_path)
    plan = plan_segmentation(image, labels, epochs=epochs)
    ends = bare_epochs(image, labels, plan)
    out.write_text(json.dumps({"ends": ends, "steps_per_epoch": plan.steps_per_epoch,
                               "batch_size": plan.batch_size, "patch": plan.patch_size}))


def bare_run(image_path: Path, labels_path: Path, epochs: int, tmp: Path) -> dict:
    """One bare side in a fresh process, as the dlorch side's agent is."""
    out = tmp / "bare.json"
    subprocess.run([sys.executable, __file__, "--bare-side", str(image_path), str(labels_path), str(out),
                    "--epochs", str(epochs)], check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--slices", type=int, default=5, help="ISBI slices to train on (the painted ones)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, in the order dlorch, bare, bare, dlorch, ...")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_overhead.json")
    ap.add_argument("--bare-side", nargs=3, type=Path, metavar=("IMAGE", "LABELS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_side:
        bare_side(*args.bare_side, args.epochs)
        return

    image = np.load(DATA / "isbi2012_train.npz")["image"][: args.slices]
    labels = np.load(DATA / "isbi2012_sparse_strokes.npz")["labels"][: args.slices]
    d_epochs: list[float] = []
    b_epochs: list[float] = []
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "image.npy", image)
        np.save(tmp / "labels.npy", labels)
        for r in range(args.rounds):
            order = ("dlorch", "bare") if r % 2 == 0 else ("bare", "dlorch")
            for side in order:
                if side == "dlorch":
                    t0 = time.perf_counter()
                    ends, job = dlorch_epochs(tmp / "image.npy", tmp / "labels.npy", args.epochs, tmp / f"home{r}")
                    d_wall = time.perf_counter() - t0
                    d_epochs += (d := np.diff(ends).tolist())
                else:
                    bare = bare_run(tmp / "image.npy", tmp / "labels.npy", args.epochs, tmp)
                    b_epochs += (b := np.diff(bare["ends"]).tolist())
            rounds.append({"order": order, "dlorch_epoch_s": d, "bare_epoch_s": b, "dlorch_job_wall_s": d_wall,
                           "attempt_timings_s": job["attempts"][0]["timings"],
                           "ratio": statistics.median(d) / statistics.median(b)})

    d_med, b_med = statistics.median(d_epochs), statistics.median(b_epochs)
    ratio = float(np.exp(np.mean([np.log(one["ratio"]) for one in rounds])))
    result = {
        "epochs": args.epochs, "slices": args.slices, "steps_per_epoch": bare["steps_per_epoch"],
        "batch_size": bare["batch_size"], "patch": bare["patch"], "rounds": rounds,
        "dlorch_epoch_median_s": d_med, "bare_epoch_median_s": b_med, "ratio": ratio,
    }
    print(f"{'':28}{'dlorch':>10}{'bare':>10}")
    print(f"{'epoch time, median (s)':28}{d_med:10.2f}{b_med:10.2f}")
    for r, one in enumerate(rounds, start=1):
        for i, (d, b) in enumerate(zip(one["dlorch_epoch_s"], one["bare_epoch_s"]), start=2):
            print(f"{f'  round {r} epoch {i}':28}{d:10.2f}{b:10.2f}")
        label = f"  round {r} ratio ({one['order'][0]} first)"
        print(f"{label:28}{one['ratio']:10.3f}")
    print(f"{'ratio dlorch / bare':28}{ratio:10.3f}   (geometric mean of the rounds'; target <= 1.03)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
