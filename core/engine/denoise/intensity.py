"""Denoising intensities: a mean and std per image, (x - mean) / std with no clipping: the noise keeps its scale."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dlorch.core.engine.inputs import check_denoising_inputs

if TYPE_CHECKING:  # the plan module plans with mean_std
    from dlorch.core.engine.denoise.plan import DenoisingPlan

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


def normalised_pair(
    image: np.ndarray, target: np.ndarray | None, plan: DenoisingPlan
) -> tuple[np.ndarray, np.ndarray | None]:
    """The (Z, Y, X) input and target stacks, float32, normalised with the plan's statistics.

    Raises:
        ValueError: the inputs are invalid, do not fit the plan's mode, or differ in shape from the
            image the plan was made for.
    """
    stack, target_stack, _ = check_denoising_inputs(image, target, plan.mode)
    if list(stack.shape) != plan.image_shape:
        raise ValueError(
            f"image shape {tuple(stack.shape)} differs from the plan's {tuple(plan.image_shape)}; "
            "re-plan with plan_denoising on this image"
        )
    inp = normalise_input(stack, plan)
    if target_stack is None:
        return inp, None
    tgt = (target_stack.astype(np.float32) - np.float32(plan.target_mean)) / np.float32(plan.target_std)
    return inp, tgt


def normalise_input(stack: np.ndarray, plan: DenoisingPlan) -> np.ndarray:
    """(x - mean) / std with the training image's statistics, float32, no clipping."""
    return (np.asarray(stack, dtype=np.float32) - np.float32(plan.input_mean)) / np.float32(plan.input_std)
