"""Accepted labels: pixels a user accepted from a prediction, trained on with less weight than painted ones.

A bootstrapping round has two kinds of labels: pixels the user painted (strokes, corrections) and
pixels of a prediction the user looked at and accepted. Accepted pixels are many and mostly right,
painted ones few and right by definition, so accepted pixels count ``accepted_weight`` (0.5 by
default) of a painted pixel in the loss. Where both label a pixel, the painted label wins; accepted
labels never enter validation, which scores held-out painted strokes only.

Both travel through sampling and augmentation as one label map: accepted class ``c`` is stored as
``c + K`` (``encode_accepted``), and the loss splits it back into a class and a weight
(``decode_accepted``), so a patch's two kinds of labels are cut and warped together.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_ACCEPTED_WEIGHT = 0.5
# Accepted class c is stored as c + K in a uint8 label map.
MAX_CLASSES_WITH_ACCEPTED = 127


def encode_accepted(train: np.ndarray, accepted: np.ndarray, painted: np.ndarray, num_classes: int) -> np.ndarray:
    """One training label map: painted training labels as they are, accepted class c as c + K.

    Args:
        train: (Z, Y, X) uint8 painted labels left for training (held-out strokes removed).
        accepted: same shape, 0 = none, 1..K.
        painted: all painted labels, held-out strokes included: accepted labels there are dropped, so
            a held-out stroke is never trained on under another name.
        num_classes: K.

    Returns:
        (Z, Y, X) uint8 map: 0 unlabelled, 1..K painted, K+1..2K accepted.

    Raises:
        ValueError: K too large for both kinds in one uint8 map.
    """
    if num_classes > MAX_CLASSES_WITH_ACCEPTED:
        raise ValueError(f"accepted labels take at most {MAX_CLASSES_WITH_ACCEPTED} classes, the labels have "
                         f"{num_classes}; train without accepted labels")
    take = (painted == 0) & (accepted > 0)
    out = train.astype(np.uint8, copy=True)
    out[take] = accepted[take].astype(np.uint8) + num_classes
    return out


def decode_accepted(labels: torch.Tensor, num_classes: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes 1..K and per-pixel loss weights (1 painted, ``weight`` accepted) of an encoded label batch."""
    acc = labels > num_classes
    classes = torch.where(acc, labels - num_classes, labels)
    weights = torch.where(acc, torch.full_like(labels, 0, dtype=torch.float32) + weight,
                          torch.ones_like(labels, dtype=torch.float32))
    return classes, weights
