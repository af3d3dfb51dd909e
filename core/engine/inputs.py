"""Input checks of both tasks, for planning, training, prediction and the CLI; every error names its fix.

NumPy only: the CLI checks a submission with these before anything is uploaded, without importing torch.
"""

from __future__ import annotations

import numpy as np

# Smallest slice either task accepts: a U-Net of three levels pads anything smaller out of recognition.
MIN_EDGE = 8
# Denoising modes: Noise2Void (the noisy image alone), Noise2Noise (a second noisy acquisition), CARE (a clean target).
MODES = ("n2v", "n2n", "care")


def as_stack(image: np.ndarray, name: str = "image") -> np.ndarray:
    """View a (Y, X) image or (Z, Y, X) stack as a (Z, Y, X) stack of 2D slices.

    Raises:
        ValueError: wrong number of axes, empty or non-finite values.
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2D (Y,X) or a stack (Z,Y,X), got shape {arr.shape}; drop channel/time axes first"
        )
    if arr.size == 0 or min(arr.shape) == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass a non-empty image")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{name} has dtype {arr.dtype}; pass a real-valued numeric array")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return arr if arr.ndim == 3 else arr[None]


def check_labels(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a sparse label map against its image.

    Args:
        image: (Y, X) or (Z, Y, X) image.
        labels: same shape, integers, 0 = unlabelled, 1..K = classes.

    Returns:
        (image stack, uint8 label stack, K).

    Raises:
        ValueError: shapes differ, labels are not small non-negative integers, nothing is
            labelled, fewer than 2 classes are painted, or class ids are not 1..K without gaps.
    """
    img = np.asarray(image)
    lab = np.asarray(labels)
    if img.shape != lab.shape:
        raise ValueError(
            f"labels shape {lab.shape} differs from image shape {img.shape}; paint labels on the same image grid"
        )
    stack = as_stack(img)
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels have dtype {lab.dtype}; pass integer labels (0 = unlabelled, 1..K = classes)")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError("labels must lie in 0..255 (0 = unlabelled, 1..K = classes); renumber the classes")
    if min(stack.shape[-2:]) < MIN_EDGE:
        raise ValueError(f"image slices are {stack.shape[-2]}x{stack.shape[-1]}; segmentation needs at least "
                         f"{MIN_EDGE}x{MIN_EDGE} pixels, pass a larger image")
    lab = lab.astype(np.uint8).reshape(stack.shape)
    counts = np.bincount(lab.reshape(-1), minlength=2)
    present = np.nonzero(counts[1:])[0] + 1
    if len(present) == 0:
        raise ValueError("labels contain no labelled pixels (all 0); paint strokes of at least 2 classes")
    if len(present) < 2:
        raise ValueError(
            f"labels contain only class {present[0]}; paint strokes of at least 2 classes (e.g. background too)"
        )
    k = int(present.max())
    missing = sorted(set(range(1, k + 1)) - set(present.tolist()))
    if missing:
        raise ValueError(f"class ids must be 1..{k} without gaps but {missing} are unpainted; renumber the labels")
    return stack, lab, k


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


def check_accepted(labels: np.ndarray, accepted: np.ndarray, num_classes: int) -> np.ndarray:
    """Validate accepted labels (pixels a user accepted from a prediction) against the painted ones.

    Args:
        labels: the painted label map (any shape ``check_labels`` accepts).
        accepted: same shape, integers, 0 = not accepted, 1..K = classes of the painted labels.
        num_classes: K, the painted labels' class count.

    Returns:
        The accepted labels as a uint8 stack of the painted labels' stack shape.

    Raises:
        ValueError: another shape, a non-integer dtype, or a class the painted labels do not have.
    """
    lab, acc = np.asarray(labels), np.asarray(accepted)
    if acc.shape != lab.shape:
        raise ValueError(f"accepted labels shape {acc.shape} differs from labels shape {lab.shape}; give accepted "
                         "labels on the same image grid")
    if not (np.issubdtype(acc.dtype, np.integer) or acc.dtype == bool):
        raise ValueError(f"accepted labels have dtype {acc.dtype}; pass integer labels (0 = not accepted, 1..K)")
    if acc.size and (acc.min() < 0 or acc.max() > num_classes):
        raise ValueError(f"accepted labels must lie in 0..{num_classes} (the painted labels' classes; 0 = not "
                         f"accepted), found {int(acc.min())}..{int(acc.max())}; renumber them as the painted labels")
    return acc.astype(np.uint8).reshape(as_stack(lab, "labels").shape)
