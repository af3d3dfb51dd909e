"""Stroke-wise validation split: hold back whole painted strokes, never single pixels.

Pixels of one stroke are strongly correlated (same cell, same membrane), so a random
pixel split leaks the training labels into validation and every checkpoint looks perfect.
Holding back whole connected components gives a validation score that tracks how well the
model generalises to structures nobody painted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlorch.core.engine.segment.components import label_strokes


@dataclass
class StrokeSplit:
    """Training and validation label maps built from one sparse label map."""

    train: np.ndarray  # (Z, Y, X) uint8, held-back strokes set to 0
    val: np.ndarray  # (Z, Y, X) uint8, only the held-back strokes
    val_strokes: int  # number of strokes held back
    train_strokes: int


def split_strokes(labels: np.ndarray, val_fraction: float, seed: int, link_slices: bool = False) -> StrokeSplit:
    """Hold back whole strokes of every class as validation.

    A class with fewer than 3 strokes stays entirely in training (holding one back would
    starve it); otherwise strokes are drawn at random until about ``val_fraction`` of that
    class's pixels are held back, always leaving at least half of them for training.

    Args:
        labels: (Z, Y, X) integer map, 0 = unlabelled.
        val_fraction: share of each class's labelled pixels to hold back (0 disables validation).
        seed: seed of the random draw.
        link_slices: strokes continue across slices (a volume trained in 3D); see ``label_strokes``.

    Returns:
        The split; ``val`` is all zeros when nothing could be held back.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    stroke_ids, stroke_class = label_strokes(labels, link_slices)
    sizes = np.bincount(stroke_ids.reshape(-1), minlength=len(stroke_class))
    rng = np.random.default_rng(seed)
    held = np.zeros(len(stroke_class), dtype=bool)
    if val_fraction > 0:
        for c in np.unique(stroke_class[1:]):
            ids = np.nonzero(stroke_class == c)[0]
            ids = ids[ids > 0]
            if len(ids) < 3:
                continue
            total = sizes[ids].sum()
            target = min(val_fraction, 0.5) * total
            taken = 0
            for i in rng.permutation(ids):
                if taken >= target:
                    break
                if taken + sizes[i] > 0.5 * total:
                    continue
                held[i] = True
                taken += sizes[i]
    val_mask = held[stroke_ids] & (stroke_ids > 0)
    train = np.where(val_mask, 0, labels).astype(np.uint8)
    val = np.where(val_mask, labels, 0).astype(np.uint8)
    n_val = int(held[1:].sum())
    return StrokeSplit(train=train, val=val, val_strokes=n_val, train_strokes=len(stroke_class) - 1 - n_val)
