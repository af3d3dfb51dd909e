"""Scores of a label map against dense truth: IoU per class, mean IoU, pixel error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlorch.core.errors import BadInput


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, classes: list[int] | None = None) -> dict[str, float]:
    """IoU of each class present in ``truth`` (label 0 ignored), their mean, and the pixel error.

    Pixels whose truth is 0 (unlabelled) are left out of every score.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    valid = truth > 0
    classes = classes or [int(c) for c in np.unique(truth[valid])]
    out: dict[str, float] = {}
    ious = []
    for c in classes:
        p, t = (pred == c) & valid, truth == c
        union = np.count_nonzero(p | t)
        iou = np.count_nonzero(p & t) / union if union else 1.0
        out[f"iou_class_{c}"] = iou
        ious.append(iou)
    out["mean_iou"] = float(np.mean(ious)) if ious else 0.0
    out["pixel_error"] = float(np.count_nonzero(pred[valid] != truth[valid]) / max(1, np.count_nonzero(valid)))
    return out


def label_map(a: np.ndarray, role: str, where: str) -> np.ndarray:
    """``a`` as an integer label map (0 = unlabelled, 1..K), or ``BadInput`` naming ``role`` and ``where``."""
    if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
        a = a.astype(np.int64)  # whole numbers saved as floats (some tools do): labels all the same
    if a.dtype.kind not in "iub":
        raise BadInput(f"{role} {where} holds {a.dtype} values, not labels; pass an integer label map (0, 1..K)")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise BadInput(f"{role} {where} holds negative labels; labels are 0 (unlabelled) and 1..K")
    return np.asarray(a)


def score_files(prediction: Path, truth: str, slices: str | None = None) -> dict[str, float]:
    """``segmentation_scores`` of a label map file against a dense truth file (``file.npz:NAME`` picks an array).

    Args:
        prediction: the predicted label map.
        truth: the dense labels.
        slices: a range of the first axis to score, as ``dlorch evaluate --slices`` takes it (``5:30``, ``7``).

    Raises:
        BadInput: files that are not label maps, of different shapes, a range that selects nothing, or a
            truth with no labelled pixel.
    """
    from dlorch.core.imageio import read_image, split_key

    pred = label_map(read_image(prediction, role="labels"), "prediction", str(prediction))
    path, key = split_key(truth)
    true = label_map(read_image(path, key, role="labels"), "truth", truth)
    if pred.shape != true.shape:
        raise BadInput(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
    if slices:
        n = pred.shape[0]
        a, sep, b = slices.partition(":")
        try:
            sl = slice(int(a) if a else None, int(b) if b else None) if sep else slice(int(a), int(a) + 1)
        except ValueError:
            raise BadInput(f"--slices {slices!r} is not a range such as 5:30") from None
        pred, true = pred[sl], true[sl]
        if pred.size == 0:
            raise BadInput(f"--slices {slices} selects none of the {n} slices; give a range inside 0:{n}")
    if not (true > 0).any():
        raise BadInput(f"truth {truth} has no labelled pixel (all 0); score against dense labels 1..K")
    return segmentation_scores(pred, true)
