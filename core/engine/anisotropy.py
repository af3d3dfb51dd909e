"""2D or 3D: how many in-plane pixels a slice step is worth, from the file's voxel size or measured from the data,
and the rule both tasks follow.

A (Z, Y, X) stack close to isotropic is processed as a volume (the network sees context across
slices); serial sections, time series and thin stacks slice by slice in 2D. Where the file gives a
physical voxel size (OME-Zarr scales, an ImageJ TIFF's resolution and spacing) that size decides;
a file without one (pixels, or ImageJ's default of 1 x 1 x 1) has its anisotropy measured.
"""

from __future__ import annotations

import math

import numpy as np

# A volume is processed in 3D when it has enough slices and a slice step is worth at most this
# many in-plane pixels (nnU-Net treats a spacing ratio above 3 as anisotropic); else per slice in 2D.
MAX_ANISOTROPY_3D = 3.0
MIN_SLICES_3D = 16


def is_volume(depth: int, aniso: float) -> bool:
    """Whether a stack of ``depth`` slices, a slice step worth ``aniso`` pixels, is processed in 3D."""
    return depth >= MIN_SLICES_3D and aniso <= MAX_ANISOTROPY_3D


def declared_anisotropy(voxel_size: tuple[float, ...] | list[float] | None) -> float | None:
    """In-plane pixels a slice step is worth by a (Z, Y, X) voxel size; None where the file declares none.

    A size of 1 x 1 x 1 is what a file without one reads as (NumPy, plain zarr, ImageJ's default),
    so it is taken as no size: the data are measured instead.
    """
    if voxel_size is None or len(voxel_size) != 3:
        return None
    z, y, x = (float(v) for v in voxel_size)
    if not all(math.isfinite(v) and v > 0 for v in (z, y, x)) or (z, y, x) == (1.0, 1.0, 1.0):
        return None
    return z / math.sqrt(y * x)


def stack_anisotropy(stack: np.ndarray, voxel_size: tuple[float, ...] | list[float] | None = None) -> tuple[float, str]:
    """The anisotropy planning uses, and where it comes from (a reason for the plan).

    Args:
        stack: (Z, Y, X).
        voxel_size: the file's physical voxel size (Z, Y, X), if it gives one.

    Returns:
        (in-plane pixels a slice step is worth, ``inf`` where too few slices to matter; the reason).
    """
    declared = declared_anisotropy(voxel_size) if stack.shape[0] > 1 else None
    if declared is not None:
        z, y, x = (float(v) for v in voxel_size)
        return declared, (f"anisotropy {declared:.2f} from the image's voxel size {z:g} x {y:g} x {x:g} (z, y, x), "
                          "not measured")
    aniso = measured_anisotropy(stack)
    if not math.isfinite(aniso):
        return aniso, f"anisotropy not measured: {stack.shape[0]} slice(s) (< {MIN_SLICES_3D} for 3D)"
    return aniso, f"anisotropy {aniso:.2f} measured from the data (the image gives no voxel size)"


def measured_anisotropy(stack: np.ndarray) -> float:
    """``anisotropy(stack)`` where the stack has slices enough for 3D, else ``inf`` (not measured)."""
    return anisotropy(stack) if stack.shape[0] >= MIN_SLICES_3D else math.inf


def anisotropy(stack: np.ndarray, max_slices: int = 16, crop: int = 256) -> float:
    """How many in-plane pixels one slice step is worth, measured from the data.

    Voxel sizes are often missing or wrong in a file's metadata; the image itself says how
    alike neighbouring slices are. This is the in-plane distance at which pixels differ as much
    (mean squared difference) as the same pixel on adjacent slices does: about 1 for an
    isotropic volume, large for serial sections cut thicker than their pixels. Noise adds the
    same amount to both sides, so it does not bias the distance, only compresses it a little.

    Args:
        stack: (Z, Y, X) image, Z >= 2.
        max_slices: adjacent slice pairs sampled (evenly spread).
        crop: side of the central crop used per slice.

    Returns:
        The distance in pixels (>= 1), or ``inf`` where even ``min(Y, X) / 4`` pixels apart
        are more alike than adjacent slices.
    """
    z, y, x = stack.shape
    if z < 2:
        return math.inf
    y0, x0 = max(0, (y - crop) // 2), max(0, (x - crop) // 2)
    picks = np.unique(np.linspace(0, z - 2, min(max_slices, z - 1)).round().astype(int))
    a = np.asarray(stack[picks, y0 : y0 + crop, x0 : x0 + crop], dtype=np.float64)
    b = np.asarray(stack[picks + 1, y0 : y0 + crop, x0 : x0 + crop], dtype=np.float64)
    dz = float(np.mean((b - a) ** 2))

    def dxy(k: int) -> float:
        return 0.5 * float(np.mean((a[:, k:] - a[:, :-k]) ** 2) + np.mean((a[:, :, k:] - a[:, :, :-k]) ** 2))

    prev_k, prev = 1, dxy(1)
    if dz <= prev:
        return 1.0
    k = 2
    while k <= max(1, min(a.shape[1:]) // 4):
        cur = dxy(k)
        if cur >= dz:  # interpolate on log2(distance) between the two measured distances
            t = (dz - prev) / max(cur - prev, 1e-12)
            return float(2 ** (math.log2(prev_k) + t * (math.log2(k) - math.log2(prev_k))))
        prev_k, prev, k = k, cur, k * 2
    return math.inf
