"""Intensity statistics of denoising data: one mean and std, no clipping (the noise must keep its scale)."""

from __future__ import annotations

import numpy as np

# Statistics come from a strided subsample: a few million voxels give the mean and std of a
# large volume to well below a percent, at a fraction of the cost.
_MAX_SAMPLES = 2_000_000


def mean_std(*arrays: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation over all given arrays (strided subsample of large ones).

    The std has a small positive floor so a constant image normalises without dividing by zero.
    """
    samples = []
    for arr in arrays:
        flat = np.asarray(arr).reshape(-1)
        step = max(1, flat.size // _MAX_SAMPLES)
        samples.append(flat[::step].astype(np.float64))
    sample = np.concatenate(samples)
    return float(sample.mean()), max(float(sample.std()), 1e-6)
