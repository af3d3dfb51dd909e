"""Segmentation learning curve: dense IoU of ISBI slices 5-29 after every epoch, for engine experiments.

The quality benchmark scores one end point, which on five painted slices moves by a few
hundredths from run to run with the measured step time. This one runs a fixed schedule
(``--epochs`` of ``--steps`` each; with ``DLORCH_THREADS=1`` it is deterministic) and after
every epoch predicts the held-out slices with the current averaged weights (EMA, the weights
the engine validates and keeps), so two settings are compared over the whole curve. Plan
fields can be overridden, a nested one in part (``--set weight_decay=0.05
'augment={"elastic_prob": 0.8}'``). Prints a line per epoch and writes JSON.

    DLORCH_THREADS=1 python bench/learning_curve.py --name wd --set weight_decay=0.05 [--epochs 20] [--steps 60]
        [--dense 0 1]   # those slices' dense labels in place of their strokes (a bootstrapping round's labels)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from dlorch.core.engine.network import build_unet
from dlorch.core.engine.segment import NoHooks, Progress, plan_segmentation, predict_probabilities, train_segmentation
from dlorch.core.engine.segment.module import CKPT_KEY
from dlorch.core.engine.segment.plan import SegmentationPlan

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "isbi2012-em"
EVAL = slice(5, 30)


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU of membrane (1) and cell (2), their mean, and the pixel error."""
    ious = [float(np.logical_and(pred == c, truth == c).sum() / max(1, np.logical_or(pred == c, truth == c).sum()))
            for c in (1, 2)]
    return {"iou_membrane": ious[0], "iou_cell": ious[1], "mean_iou": float(np.mean(ious)),
            "pixel_error": float((pred != truth).mean())}


class CurveHooks(NoHooks):
    """After every epoch: the averaged weights of the checkpoint, scored on the dense held-out slices."""

    def __init__(self, image: np.ndarray, truth: np.ndarray) -> None:
        self.image, self.truth = image, truth
        self.rows: list[dict] = []

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        own = torch.load(path, map_location="cpu", weights_only=True)[CKPT_KEY]
        plan = SegmentationPlan.model_validate(own["plan"])
        plan = plan.model_copy(update={"train_prior": list(own["train_prior"])})
        net = build_unet(plan.spatial_dims, 1, plan.num_classes, plan.filters, plan.norm, plan.input_scale)
        net.load_state_dict(own["ema"])
        probs = predict_probabilities(None, self.image[EVAL], model=(net.eval(), plan), tta=False)
        row = {"epoch": progress.epochs_done, **score(probs.argmax(0) + 1, self.truth[EVAL]),
               **{k: progress.metrics.get(k) for k in ("train_loss", "val_iou", "train_seconds")}}
        self.rows.append(row)
        print(f"  epoch {row['epoch']:3d}  dense mIoU {row['mean_iou']:.4f}  (membrane {row['iou_membrane']:.3f}, "
              f"cell {row['iou_cell']:.3f})  val_iou {row['val_iou']:.4f}  train_loss {row['train_loss']:.4f}"
              f"  t {row['train_seconds']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="plain")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60, help="steps per epoch")
    ap.add_argument("--set", nargs="*", default=[], help="plan overrides, FIELD=JSON")
    ap.add_argument("--dense", type=int, nargs="*", default=[],
                    help="slices (0-4) whose dense labels replace their strokes, as a wholly corrected slice")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    train = np.load(DATA / "isbi2012_train.npz")
    image, truth = train["image"], train["labels"]
    strokes = np.load(DATA / "isbi2012_sparse_strokes.npz")["labels"].copy()
    if any(not 0 <= z < EVAL.start for z in args.dense):
        ap.error(f"--dense takes slices 0-{EVAL.start - 1}: slices {EVAL.start}-29 are the ones scored")
    for z in args.dense:
        strokes[z] = truth[z]
    plan = plan_segmentation(image, strokes, epochs=args.epochs)
    overrides = {"steps_per_epoch": args.steps, "time_budget_s": None, "stop_at_plateau": False}
    overrides.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    merged = plan.model_dump()
    for key, value in overrides.items():  # a nested field (augment) takes a partial dict
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    plan = SegmentationPlan.model_validate(merged)
    print(f"{args.name}: {args.epochs} epochs x {args.steps} steps, {int((strokes > 0).sum()):,} labelled pixels "
          f"(dense slices {args.dense or 'none'}), overrides {overrides}", flush=True)

    hooks = CurveHooks(image, truth)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        train_segmentation(image, strokes, plan, workdir=pathlib.Path(workdir), resume_from=None, hooks=hooks)
    peak = max(hooks.rows, key=lambda r: r["mean_iou"])
    result = {"name": args.name, "overrides": overrides, "dense_slices": args.dense,
              "labelled_pixels": int((strokes > 0).sum()), "threads": os.environ.get("DLORCH_THREADS"),
              "seconds": time.perf_counter() - t0, "peak": peak, "last": hooks.rows[-1], "curve": hooks.rows}
    print(f"{args.name}: peak dense mIoU {peak['mean_iou']:.4f} at epoch {peak['epoch']}, "
          f"last {hooks.rows[-1]['mean_iou']:.4f}")
    out = args.out or HERE / "results" / f"curve-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
