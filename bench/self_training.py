"""Engine experiment: self-training on ISBI, a teacher's confident labels for every slice, then a student.

The strokes cover 4% of five slices. A teacher trained on them for half the budget predicts the
whole stack with test-time augmentation, which scores 0.02-0.04 mean IoU above its plain
prediction. Its labels where the top class has probability >= ``--confidence`` (the strokes
where painted) then train a student from scratch for the other half. This is Noisy Student
(Xie et al. 2020) with the engine's augmentation as the noise. Both are scored on slices 5-29,
plain and with test-time augmentation. Prints a table and writes JSON.

    python bench/self_training.py [--teacher-seconds 300] [--student-seconds 300] [--confidence 0.9]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import tempfile
import time

import numpy as np

from dlorch.core.engine.segment import NoHooks, plan_segmentation, predict_probabilities, train_segmentation
from denoise_quality import save
from quality import DATA, EVAL_SLICES, HERE, score


def train_and_score(image: np.ndarray, labels: np.ndarray, truth: np.ndarray, seconds: float,
                    workdir: pathlib.Path) -> tuple[dict, np.ndarray]:
    """Train on ``labels`` for ``seconds``; the scores and the TTA probabilities of the whole stack."""
    plan = plan_segmentation(image, labels, time_budget=seconds)
    t0 = time.perf_counter()
    result = train_segmentation(image, labels, plan, workdir=workdir, resume_from=None, hooks=NoHooks())
    train_s = time.perf_counter() - t0
    probs = predict_probabilities(result.checkpoint, image, tta=True)
    plain = predict_probabilities(result.checkpoint, image, tta=False).argmax(0) + 1
    report = {"train_seconds": train_s, "epochs_done": result.epochs_done, "labelled_pixels": int((labels > 0).sum()),
              "plain": score(plain[EVAL_SLICES], truth[EVAL_SLICES]),
              "tta": score((probs.argmax(0) + 1)[EVAL_SLICES], truth[EVAL_SLICES])}
    return report, probs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-seconds", type=float, default=300.0)
    ap.add_argument("--student-seconds", type=float, default=300.0)
    ap.add_argument("--confidence", type=float, default=0.9, help="top-class probability a pseudo-label needs")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "self_training.json")
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    train = np.load(args.data / "isbi2012_train.npz")
    image, truth = train["image"], train["labels"]
    strokes = np.load(args.data / "isbi2012_sparse_strokes.npz")["labels"]
    with tempfile.TemporaryDirectory() as workdir:
        teacher, probs = train_and_score(image, strokes, truth, args.teacher_seconds, pathlib.Path(workdir) / "t")
        labels = probs.argmax(0) + 1
        pseudo = np.where(strokes > 0, strokes, np.where(probs.max(0) >= args.confidence, labels, 0)).astype(strokes.dtype)
        scored = pseudo[EVAL_SLICES] > 0
        pseudo_stats = {"share_labelled": float((pseudo > 0).mean()),
                        "accuracy_on_eval_slices": float((pseudo[EVAL_SLICES] == truth[EVAL_SLICES])[scored].mean())}
        student, _ = train_and_score(image, pseudo, truth, args.student_seconds, pathlib.Path(workdir) / "s")
    print(f"\nISBI 2012, strokes on slices 0-4, scored on 5-29; pseudo-labels at confidence >= {args.confidence}: "
          f"{pseudo_stats['share_labelled']:.0%} of the stack, {pseudo_stats['accuracy_on_eval_slices']:.1%} right")
    print(f"{'model':>8}  {'seconds':>7}  {'mean IoU':>8}  {'with TTA':>8}  {'membrane':>8}  {'cell':>6}")
    for name, r in (("teacher", teacher), ("student", student)):
        print(f"{name:>8}  {r['train_seconds']:>7.0f}  {r['plain']['mean_iou']:>8.3f}  {r['tta']['mean_iou']:>8.3f}"
              f"  {r['tta']['iou_membrane']:>8.3f}  {r['tta']['iou_cell']:>6.3f}")
    return save({"confidence": args.confidence, "teacher": teacher, "student": student, "pseudo_labels": pseudo_stats},
                args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
