"""Per-image intensity normalisation: percentile clipping followed by a z-score.

Percentiles rather than min/max make the statistics robust to hot pixels and padding, and
computing them per image (not from the training set) lets a model trained on one
acquisition be applied to another with a different gain or offset.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

# Statistics come from a strided subsample: percentiles of a few million voxels are as good
# as those of all of them and keep normalisation cheap on large volumes.
_MAX_SAMPLES = 2_000_000


class IntensityStats(BaseModel):
    """Clipping window and z-score parameters of one image."""

    low: float
    high: float
    mean: float
    std: float


def intensity_stats(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> IntensityStats:
    """Compute the clipping window and z-score parameters of an image.

    Args:
        image: array of any shape and real dtype.
        low_pct: lower clipping percentile.
        high_pct: upper clipping percentile.

    Returns:
        The statistics; std is never below a small positive floor, so a constant image is safe.
    """
    flat = np.asarray(image).reshape(-1)
    step = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::step].astype(np.float64)
    low, high = np.percentile(sample, [low_pct, high_pct])
    clipped = np.clip(sample, low, high)
    std = float(clipped.std())
    return IntensityStats(low=float(low), high=float(high), mean=float(clipped.mean()), std=max(std, 1e-6))


def normalize(image: np.ndarray, stats: IntensityStats | None = None) -> np.ndarray:
    """Clip to the percentile window and z-score; float32 output of the same shape.

    Args:
        image: the image to normalise.
        stats: statistics to use; computed from ``image`` itself when None.

    Returns:
        The normalised float32 image.
    """
    stats = stats or intensity_stats(image)
    out = np.clip(np.asarray(image, dtype=np.float32), stats.low, stats.high)
    out -= np.float32(stats.mean)
    out /= np.float32(stats.std)
    return out
