"""2D or 3D on a volume: does the automatic choice pay? Synthetic isotropic volume, same time budget.

A volume of tubes that wander through Z (isotropic structure, Gaussian noise) is painted with
sparse strokes on three slices. The automatic plan (3D, because adjacent slices are as alike
as neighbouring pixels) and its ``other-geometry`` candidate (2D, slice by slice) train for the
same number of seconds; both are scored on every voxel against the truth. Prints a table and
writes JSON.

    python bench/geometry.py [--time-budget 120] [--out bench/results/geometry.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import tempfile
import time

import numpy as np

from dlorch.core.engine.segment import NoHooks, plan_segmentation, predict_segmentation, train_segmentation
from dlorch.core.engine.segment.zoo import apply_variant

HERE = pathlib.Path(__file__).resolve().parent


def tube_volume(shape=(64, 160, 160), seed=5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, sparse strokes, truth): tubes of radius 7-11 wandering along Z, noise sigma ~ contrast / 1.5."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = np.ones(shape, np.uint8)
    for _ in range(10):
        cy, cx = rng.integers(20, shape[1] - 20, 2)
        r, fy, fx, py = rng.uniform(7, 11), rng.uniform(6, 14), rng.uniform(6, 14), rng.uniform(0, 6.3)
        cy_z = cy + 12 * np.sin(zz / fy + py)
        cx_z = cx + 12 * np.cos(zz / fx)
        truth[(yy - cy_z) ** 2 + (xx - cx_z) ** 2 < r**2] = 2
    image = (truth * 60.0 + rng.normal(0, 40, shape)).astype(np.float32)
    strokes = np.zeros(shape, np.uint8)
    for z in (8, 32, 56):
        paint = rng.random(shape[1:]) < 0.03
        strokes[z][paint] = truth[z][paint]
    return image, strokes, truth


def iou(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    return float(np.logical_and(pred == c, truth == c).sum() / max(1, np.logical_or(pred == c, truth == c).sum()))


def run(time_budget: float) -> list[dict]:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    image, strokes, truth = tube_volume()
    auto = plan_segmentation(image, strokes, time_budget=time_budget)
    rows = []
    for name, plan in (("automatic", auto), ("other-geometry", apply_variant(auto, "other-geometry"))):
        # Same seconds for both: the epoch count is left open and the time budget ends training
        # (the learning rate anneals by the share of the budget used).
        plan = plan.model_copy(update={"epochs": 100_000})
        with tempfile.TemporaryDirectory() as wd:
            t0 = time.perf_counter()
            result = train_segmentation(image, strokes, plan, workdir=pathlib.Path(wd), resume_from=None, hooks=NoHooks())
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pred = predict_segmentation(result.checkpoint, image)
            predict_s = time.perf_counter() - t0
        rows.append({
            "plan": name, "spatial_dims": plan.spatial_dims, "patch": plan.patch_size, "filters": plan.filters,
            "anisotropy": auto.anisotropy, "epochs_done": result.epochs_done, "steps": result.epochs_done * plan.steps_per_epoch,
            "train_seconds": train_s, "predict_seconds": predict_s,
            "iou_background": iou(pred, truth, 1), "iou_tubes": iou(pred, truth, 2),
            "voxel_accuracy": float((pred == truth).mean()),
        })
        rows[-1]["mean_iou"] = (rows[-1]["iou_background"] + rows[-1]["iou_tubes"]) / 2
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", type=float, default=120.0, help="training seconds per plan (default 120)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "geometry.json")
    args = ap.parse_args(argv)
    rows = run(args.time_budget)
    print(f"\nsynthetic tubes 64x160x160, strokes on 3 slices, anisotropy {rows[0]['anisotropy']}, "
          f"{args.time_budget:g} s of training each")
    print(f"  {'plan':<15} {'dims':>4} {'patch':<14} {'steps':>6} {'train s':>8} {'mean IoU':>9} {'IoU tubes':>10} {'accuracy':>9}")
    for r in rows:
        print(f"  {r['plan']:<15} {r['spatial_dims']:>4} {'x'.join(map(str, r['patch'])):<14} {r['steps']:>6} "
              f"{r['train_seconds']:>8.1f} {r['mean_iou']:>9.3f} {r['iou_tubes']:>10.3f} {r['voxel_accuracy']:>9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
