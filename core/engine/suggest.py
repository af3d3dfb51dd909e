"""Where to correct next: candidates' disagreement and tiles ranked for a user's corrections (pure NumPy).

After a round of training the wizard shows several candidates' segmentations. Where they disagree,
or where the chosen model is unsure (low confidence), a correction teaches the next round the most;
where the user already labelled everything, it teaches nothing. ``rank_tiles`` turns those maps into
a short list of tiles to look at first.
"""

from __future__ import annotations

import numpy as np


def disagreement(segmentations: list[np.ndarray]) -> np.ndarray:
    """Per pixel, the fraction of candidates that disagree with the majority label.

    Args:
        segmentations: two or more label maps of one shape (one candidate may be given: all zero).

    Returns:
        float32 map of that shape in [0, 1 - 1/n]: 0 where every candidate agrees. The majority is
        the most frequent label of the pixel (ties: either; the fraction is the same).

    Raises:
        ValueError: no segmentation, or shapes that differ.
    """
    if len(segmentations) == 0:
        raise ValueError("disagreement needs at least one segmentation; pass the candidates' label maps")
    shape = np.shape(segmentations[0])
    if any(np.shape(s) != shape for s in segmentations):
        raise ValueError(f"segmentations differ in shape ({sorted({np.shape(s) for s in segmentations})}); pass label "
                         "maps of the same image")
    stack = np.stack([np.asarray(s) for s in segmentations])
    most = np.zeros(shape, dtype=np.int32)
    for value in np.unique(stack):
        np.maximum(most, (stack == value).sum(0, dtype=np.int32), out=most)
    return (1.0 - most / np.float32(len(segmentations))).astype(np.float32)


def rank_tiles(disagreement: np.ndarray, confidence: np.ndarray | None = None, tile: int = 128,
               labelled: np.ndarray | None = None, k: int = 8) -> list[dict]:
    """The ``k`` tiles most worth correcting, best first.

    A pixel's need of correction is the candidates' disagreement, averaged with the model's
    uncertainty (1 - confidence / 255) when a confidence map is given. A tile's score is the mean
    need over its unlabelled pixels; fully labelled tiles, and tiles where nothing is needed (score 0),
    are left out. Tiles cut each slice on a grid of ``tile`` pixels from its corner; edge tiles are smaller.

    Args:
        disagreement: (Y, X) or (Z, Y, X) map in [0, 1] (``disagreement``).
        confidence: same shape, uint8 0..255 (a prediction's ``confidence`` output), or None.
        tile: tile edge in pixels.
        labelled: same shape, nonzero where the user has labelled (painted or accepted), or None.
        k: tiles to return at most.

    Returns:
        Dicts ``{"slice", "y", "x", "h", "w", "score"}`` (``slice`` 0 for a 2D map), by score, then
        slice, y and x.

    Raises:
        ValueError: shapes that differ, a map that is not 2D or 3D, or tile or k below 1.
    """
    need = np.asarray(disagreement, dtype=np.float32)
    if need.ndim not in (2, 3):
        raise ValueError(f"disagreement must be 2D (Y, X) or 3D (Z, Y, X), got shape {need.shape}")
    if tile < 1 or k < 1:
        raise ValueError(f"tile and k must be at least 1, got tile={tile}, k={k}")
    for name, other in (("confidence", confidence), ("labelled", labelled)):
        if other is not None and np.shape(other) != need.shape:
            raise ValueError(f"{name} shape {np.shape(other)} differs from disagreement shape {need.shape}; pass maps "
                             "of the same image")
    if confidence is not None:
        need = (need + (1.0 - np.asarray(confidence, dtype=np.float32) / 255.0)) / 2
    stack = need if need.ndim == 3 else need[None]
    free = np.ones(stack.shape, dtype=np.float32) if labelled is None else \
        (np.asarray(labelled) == 0).reshape(stack.shape).astype(np.float32)
    ys, xs = np.arange(0, stack.shape[1], tile), np.arange(0, stack.shape[2], tile)

    def tile_sums(a: np.ndarray) -> np.ndarray:  # (Z, tiles along Y, tiles along X)
        return np.add.reduceat(np.add.reduceat(a, ys, axis=1), xs, axis=2)

    total, count = tile_sums(stack * free), tile_sums(free)
    score = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    order = sorted(zip(*np.nonzero(score > 0)), key=lambda i: (-score[i], *i))[:k]
    return [{"slice": int(z), "y": int(ys[i]), "x": int(xs[j]), "h": int(min(tile, stack.shape[1] - ys[i])),
             "w": int(min(tile, stack.shape[2] - xs[j])), "score": float(score[z, i, j])} for z, i, j in order]
