"""Input checks and intensity statistics for denoising; every error is one line naming its fix."""

from __future__ import annotations

import numpy as np

from dlorch.core.engine.inputs import MIN_EDGE, as_stack

MODES = ("n2v", "n2n", "care")
# Smallest slice edge the blind-spot window (5x5) and a 2-level U-Net can work with.
# Statistics come from a strided subsample: a few million voxels give the mean and std of a
# large volume to well below a percent, at a fraction of the cost.
_MAX_SAMPLES = 2_000_000


def resolve_mode(mode: str | None, has_target: bool) -> str:
    """The training mode: the caller's, or "n2v" without a target and "care" with one.

    Raises:
        ValueError: unknown mode, or a mode that does not fit the presence of a target.
    """
    if mode is None:
        return "care" if has_target else "n2v"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} or None (automatic), got {mode!r}")
    if mode == "n2v" and has_target:
        raise ValueError("mode 'n2v' learns from the noisy image alone; drop target or use mode 'n2n' or 'care'")
    if mode != "n2v" and not has_target:
        what = "a second noisy acquisition" if mode == "n2n" else "a clean image"
        raise ValueError(f"mode {mode!r} needs a target ({what} of the same scene); pass target= or use mode 'n2v'")
    return mode


def check_denoising_inputs(
    image: np.ndarray, target: np.ndarray | None, mode: str | None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Validate an image (and its target) for denoising.

    Args:
        image: (Y, X) image or (Z, Y, X) stack of 2D slices, any real dtype.
        target: None, or an array of the image's shape.
        mode: "n2v", "n2n", "care" or None for automatic.

    Returns:
        (image stack (Z, Y, X), target stack or None, resolved mode). Arrays are views where possible.

    Raises:
        ValueError: wrong axes, empty, non-finite, non-numeric, mismatched shapes, slices smaller
            than 8x8, or a mode that does not fit the target.
    """
    stack = as_stack(image, "image")
    mode = resolve_mode(mode, target is not None)
    if min(stack.shape[-2:]) < MIN_EDGE:
        raise ValueError(
            f"image slices are {stack.shape[-2]}x{stack.shape[-1]}; denoising needs at least "
            f"{MIN_EDGE}x{MIN_EDGE} pixels, pass a larger image"
        )
    target_stack = None
    if target is not None:
        tgt = np.asarray(target)
        if tgt.shape != np.shape(image):
            raise ValueError(
                f"target shape {tgt.shape} differs from image shape {np.shape(image)}; pass a target on the same grid"
            )
        target_stack = as_stack(tgt, "target")
    return stack, target_stack, mode


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
