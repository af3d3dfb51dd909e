"""Segmentation quality benchmark: ISBI 2012 EM, trained on sparse strokes with the automatic plan.

Trains on the full 30-slice stack with the painted strokes (slices 0-4), predicts the stack,
and scores slices 5-29 against the dense labels: IoU per class, mean IoU, pixel error, and
the seconds spent planning, training and predicting. Prints a table and writes JSON.

    python bench/quality.py [--time-budget SECONDS] [--epochs N] [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

from dlorch.core.engine.device import detect_runtime
from dlorch.core.engine.priors import estimate_priors
from dlorch.core.engine.segment import (
    NoHooks,
    Progress,
    load_model,
    plan_segmentation,
    predict_probabilities,
    predict_segmentation,
    train_segmentation,
)

DATA = pathlib.Path("/work/shared/data/isbi2012-em")
CLASSES = {1: "membrane", 2: "cell"}
EVAL_SLICES = slice(5, 30)
HERE = pathlib.Path(__file__).resolve().parent


class PrintingHooks(NoHooks):
    """Prints one line per checkpoint so a long run shows its progress."""

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        m = progress.metrics
        print(
            f"  epoch {progress.epochs_done:3d}/{progress.epochs_total}  train_loss {m.get('train_loss', float('nan')):.4f}"
            f"  val_iou {m.get('val_iou', float('nan')):.4f}  lr {m.get('lr', float('nan')):.2e}"
            f"  t {m.get('train_seconds', 0):6.1f}s",
            flush=True,
        )


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU of every class, their mean, and the pixel error of a label map against the truth."""
    out: dict[str, float] = {}
    for c, name in CLASSES.items():
        inter = np.logical_and(pred == c, truth == c).sum()
        union = np.logical_or(pred == c, truth == c).sum()
        out[f"iou_{name}"] = float(inter / union) if union else float("nan")
    out["mean_iou"] = float(np.mean([out[f"iou_{n}"] for n in CLASSES.values()]))
    out["pixel_error"] = float((pred != truth).mean())
    return out


def _fmt(values: list[float] | None) -> str:
    return "-" if values is None else "/".join(f"{v:.3f}" for v in values)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", type=float, default=None, help="cap on training seconds (default: plan's)")
    ap.add_argument("--epochs", type=int, default=None, help="override the automatic epoch count")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "quality.json")
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    train = np.load(args.data / "isbi2012_train.npz")
    image, truth = train["image"], train["labels"]
    strokes = np.load(args.data / "isbi2012_sparse_strokes.npz")["labels"]

    t_start = time.perf_counter()
    plan = plan_segmentation(image, strokes, epochs=args.epochs, time_budget=args.time_budget)
    plan_s = time.perf_counter() - t_start
    print("plan:", *plan.reasons, sep="\n  ", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train_segmentation(
            image, strokes, plan, workdir=pathlib.Path(workdir), resume_from=None, hooks=PrintingHooks()
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = predict_segmentation(result.checkpoint, image)
        predict_s = time.perf_counter() - t0
        # Diagnostics, not timed: the network's raw argmax and the class priors behind the correction.
        raw = predict_probabilities(result.checkpoint, image, priors=None)
        train_prior = load_model(result.checkpoint)[1].train_prior
        image_prior = estimate_priors(raw, train_prior).tolist() if train_prior else None
        raw_scores = score((raw.argmax(0) + 1)[EVAL_SLICES], truth[EVAL_SLICES])
    total_s = time.perf_counter() - t_start

    scores = score(pred[EVAL_SLICES], truth[EVAL_SLICES])
    report = {
        **scores,
        "plan_seconds": plan_s,
        "train_seconds": train_s,
        "predict_seconds": predict_s,
        "total_seconds": total_s,
        "epochs_done": result.epochs_done,
        "epochs_planned": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "stopped_by": result.stopped_by,
        "best_epoch": result.metrics.get("best_epoch"),
        "best_val_iou": result.metrics.get("best_val_iou"),
        "time_budget_s": plan.time_budget_s,
        "device": detect_runtime().accelerator,
        "machine": f"{platform.processor() or platform.machine()}, {detect_runtime().cpu_threads} threads",
        "raw_argmax_mean_iou": raw_scores["mean_iou"],
        "train_prior": train_prior,
        "estimated_image_prior": image_prior,
        "true_prior_eval_slices": [float((truth[EVAL_SLICES] == c).mean()) for c in CLASSES],
        "plan": plan.model_dump(mode="json"),
    }
    rows = [
        ("IoU membrane", f"{scores['iou_membrane']:.4f}"),
        ("IoU cell", f"{scores['iou_cell']:.4f}"),
        ("mean IoU", f"{scores['mean_iou']:.4f}"),
        ("pixel error", f"{scores['pixel_error']:.4f}"),
        ("mean IoU, no prior fix", f"{raw_scores['mean_iou']:.4f}  (priors: train {_fmt(train_prior)}, image {_fmt(image_prior)})"),
        ("plan seconds", f"{plan_s:.1f}"),
        ("train seconds", f"{train_s:.1f}  ({result.epochs_done}/{plan.epochs} epochs, stopped by {result.stopped_by})"),
        ("predict seconds", f"{predict_s:.1f}"),
        ("total seconds", f"{total_s:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nISBI 2012, sparse strokes on slices 0-4, scored on slices 5-29")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
