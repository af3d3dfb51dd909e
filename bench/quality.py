"""Segmentation quality benchmark: ISBI 2012 EM, trained on sparse strokes with the automatic plan.

Trains on the full 30-slice stack with the painted strokes (slices 0-4), predicts the stack,
and scores slices 5-29 against the dense labels: IoU per class, mean IoU, pixel error, and
the seconds spent planning, training and predicting. Prints a table and writes JSON.

Then the same for denoising (``denoise_quality.run``): Gaussian noise sigma 25 on the ISBI
stack, Noise2Void from the noisy stack alone, PSNR of the noisy input and of the output.

``--references`` adds, per budget, what the same engine reaches when told more: segmentation
trained on every pixel of slices 0-4 (dense labels of the painted slices) and CARE denoising
trained with the clean stack as target. They bound what the strokes / the noisy stack alone
can be expected to give; they are references, not results.

    python bench/quality.py [--budgets 600 1200] [--tasks segment denoise] [--references] [--out bench/results/quality.json]
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
from dlorch.core.engine.segment import (
    NoHooks,
    Progress,
    load_model,
    plan_segmentation,
    predict_probabilities,
    predict_segmentation,
    train_segmentation,
)
from dlorch.core.engine.segment.priors import estimate_priors

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-em"
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


def run_segmentation(
    time_budget: float | None, epochs: int | None = None, data: pathlib.Path = DATA, labels: str = "strokes"
) -> dict:
    """Train within ``time_budget`` seconds, predict the stack, score slices 5-29.

    ``labels`` is "strokes" (the painted strokes: the benchmark) or "dense" (every pixel of the
    same slices 0-4 labelled: a reference for what full labels of those slices reach).
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    train = np.load(data / "isbi2012_train.npz")
    image, truth = train["image"], train["labels"]
    strokes = np.load(data / "isbi2012_sparse_strokes.npz")["labels"]
    if labels == "dense":
        painted = strokes.reshape(strokes.shape[0], -1).any(1)
        strokes = np.where(painted[:, None, None], truth, 0).astype(strokes.dtype)

    t_start = time.perf_counter()
    plan = plan_segmentation(image, strokes, epochs=epochs, time_budget=time_budget)
    plan_s = time.perf_counter() - t_start
    print("plan:", *plan.reasons, sep="\n  ", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train_segmentation(
            image, strokes, plan, workdir=pathlib.Path(workdir), resume_from=None, hooks=PrintingHooks()
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = predict_segmentation(result.checkpoint, image, tta=False)  # the plan may choose TTA: both rows shown
        predict_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred_tta = predict_segmentation(result.checkpoint, image, tta=True)
        predict_tta_s = time.perf_counter() - t0
        # Diagnostics, not timed: the network's raw argmax and the class priors behind the correction.
        raw = predict_probabilities(result.checkpoint, image, priors=None)
        train_prior = load_model(result.checkpoint)[1].train_prior
        image_prior = estimate_priors(raw, train_prior).tolist() if train_prior else None
        raw_scores = score((raw.argmax(0) + 1)[EVAL_SLICES], truth[EVAL_SLICES])
    total_s = time.perf_counter() - t_start

    scores = score(pred[EVAL_SLICES], truth[EVAL_SLICES])
    tta = score(pred_tta[EVAL_SLICES], truth[EVAL_SLICES])
    return {
        **scores,
        "labels": labels,
        "labelled_pixels": int((strokes > 0).sum()),
        "tta": {**tta, "predict_seconds": predict_tta_s},
        "plan_seconds": plan_s,
        "train_seconds": train_s,
        "predict_seconds": predict_s,
        "total_seconds": total_s,
        "epochs_done": result.epochs_done,
        "epochs_planned": plan.epochs,
        "epochs_total": result.epochs_total or plan.epochs,  # re-fitted to the budget as the epochs ran
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
        "train_samples_per_s": result.epochs_done * plan.steps_per_epoch * plan.batch_size / train_s,
        "predict_mvox_per_s": image.size / 1e6 / predict_s,
        "plan": plan.model_dump(mode="json"),
    }


def print_segmentation(r: dict) -> None:
    rows = [
        ("IoU membrane", f"{r['iou_membrane']:.4f}"),
        ("IoU cell", f"{r['iou_cell']:.4f}"),
        ("mean IoU", f"{r['mean_iou']:.4f}"),
        ("pixel error", f"{r['pixel_error']:.4f}"),
        ("mean IoU with --tta", f"{r['tta']['mean_iou']:.4f}  (membrane {r['tta']['iou_membrane']:.4f}, "
                                f"cell {r['tta']['iou_cell']:.4f}, pixel error {r['tta']['pixel_error']:.4f}, "
                                f"{r['tta']['predict_seconds']:.1f} s)"),
        ("mean IoU, no prior fix",
         f"{r['raw_argmax_mean_iou']:.4f}  (priors: train {_fmt(r['train_prior'])}, image {_fmt(r['estimated_image_prior'])})"),
        ("plan seconds", f"{r['plan_seconds']:.1f}"),
        ("train seconds", f"{r['train_seconds']:.1f}  ({r['epochs_done']}/{r['epochs_total']} epochs, {r['epochs_planned']} planned, "
                          f"stopped by {r['stopped_by']})"),
        ("predict seconds", f"{r['predict_seconds']:.1f}"),
        ("total seconds", f"{r['total_seconds']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    what = "sparse strokes" if r.get("labels", "strokes") == "strokes" else "dense labels (reference)"
    print(f"\nISBI 2012, {what} on slices 0-4 ({r.get('labelled_pixels', 0):,} pixels), scored on slices 5-29 "
          f"(budget {r['time_budget_s']} s)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[600.0],
                    help="training time budgets in seconds, one run per task each (e.g. 600 1200)")
    ap.add_argument("--tasks", nargs="+", choices=["segment", "denoise"], default=["segment", "denoise"])
    ap.add_argument("--epochs", type=int, default=None, help="override the automatic epoch count (segmentation)")
    ap.add_argument("--references", action="store_true",
                    help="also train on dense labels of slices 0-4 and CARE on the clean stack (upper references)")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "quality.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import denoise_quality

    runs: list[dict] = []
    for budget in args.budgets:
        if "segment" in args.tasks:
            for labels in ("strokes", "dense") if args.references else ("strokes",):
                r = run_segmentation(budget, args.epochs, args.data, labels=labels)
                print_segmentation(r)
                runs.append({"task": "segment", "budget_s": budget, **r})
                _save(args.out, runs)
        if "denoise" in args.tasks:
            for supervised in (False, True) if args.references else (False,):
                r = denoise_quality.run(budget, args.data / "isbi2012_train.npz", supervised=supervised)
                denoise_quality.print_table(r)
                runs.append({"task": "denoise", "budget_s": budget, **r})
                _save(args.out, runs)
    print("\nsummary (targets at 600 s on this CPU: mean IoU >= 0.78, denoising gain >= +6 dB)")
    print(f"  {'task':<8} {'trained on':<14} {'budget s':>9} {'train s':>8} {'epochs':>7}  result")
    for r in runs:
        source = r.get("labels") or ("clean (ref)" if r.get("mode") == "care" else "noisy alone")
        source = "dense (ref)" if source == "dense" else source
        what = (f"mean IoU {r['mean_iou']:.3f} (membrane {r['iou_membrane']:.3f}, cell {r['iou_cell']:.3f}), "
                f"pixel error {r['pixel_error']:.3f}; with --tta {r['tta']['mean_iou']:.3f}" if r["task"] == "segment" else
                f"PSNR {r['psnr_noisy']:.2f} -> {r['psnr_denoised']:.2f} dB, gain {r['gain_db']:+.2f} dB")
        print(f"  {r['task']:<8} {source:<14} {r['budget_s']:>9.0f} {r['train_seconds']:>8.1f} {r['epochs_done']:>7}  {what}")
    _save(args.out, runs)
    print(f"wrote {args.out}")
    return {"runs": runs}


def _save(path: pathlib.Path, runs: list[dict]) -> None:
    """Write the runs so far (a long benchmark keeps what it measured if it is stopped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
