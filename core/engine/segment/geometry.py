"""Segmentation geometry: 2D or 3D, input scale, patch, network widths and batch, for an image and a device.

Pure rules, each with its reasons; ``plan.py`` gathers them into a plan.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from dlorch.core.engine.anisotropy import MAX_ANISOTROPY_3D, MIN_SLICES_3D, is_volume
from dlorch.core.engine.device import Runtime
from dlorch.core.engine.network import choose_filters


class DeviceDefaults(BaseModel):
    """Starting points per accelerator, shrunk by the rules to fit the data."""

    patch: int
    batch: int
    filters: list[int]
    infer_roi: int
    budget_s: float  # training seconds when the user gives neither epochs nor a budget
    epoch_s: float  # target length of one epoch: bounds how late a stop request is honoured
    patch3d: int  # cube side of a 3D patch (volumes that are close to isotropic)
    batch3d: int
    infer_roi3d: int


DEFAULTS = {
    # A 2-core CPU trains ~1500 steps in its 5.5 minute default: narrow but 5 levels deep,
    # because telling membranes from organelle outlines needs context more than width.
    "cpu": DeviceDefaults(patch=128, batch=8, filters=[16, 24, 48, 96, 192], infer_roi=1024, budget_s=330, epoch_s=20,
                          patch3d=64, batch3d=2, infer_roi3d=96),
    "cuda": DeviceDefaults(patch=256, batch=16, filters=[32, 64, 128, 256, 320], infer_roi=1024, budget_s=1800,
                           epoch_s=30, patch3d=128, batch3d=2, infer_roi3d=192),
}
# The cuda batches above are for a GPU of this much memory; a larger one gets proportionally
# more patches per step (powers of two, at most MAX_BATCH), a smaller one fewer.
REFERENCE_GPU_BYTES = 16 * 2**30
MAX_BATCH = 64
# Share of the device memory the activations of one training step may take (the rest: weights,
# optimiser state, cuDNN workspaces, the data, other processes on a shared node).
ACTIVATION_MEMORY_SHARE = 0.25
# Activation tensors kept for the backward pass per voxel and level width: two convolutions x
# (input, normalised, activated) on the way down, upsampling, concatenation and two more on the way up.
ACTIVATIONS_PER_LEVEL = 14
# Half resolution needs an image of at least this size and strokes this thick (see choose_geometry).
HALF_RES_MIN_SIZE = 256
HALF_RES_MIN_SURVIVAL = 0.3


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def choose_patch(image_yx: tuple[int, int], default: int, multiple: int = 16) -> list[int]:
    """Patch per axis: the device default, or the image size rounded up to ``multiple`` when smaller."""
    return [min(default, _round_up(max(int(d), multiple), multiple)) for d in image_yx]


def stroke_survival(labels: np.ndarray) -> float:
    """How thick the painted strokes are: for the thinnest class, the share of its pixels whose
    whole 3x3 neighbourhood is painted the same class (0 for 1-pixel scribbles, ~0.6 for 5-pixel ones).
    """
    lab = np.asarray(labels)
    lab = lab.reshape(-1, *lab.shape[-2:])
    lab = lab[lab.reshape(lab.shape[0], -1).any(1)]
    shares = []
    for c in np.unique(lab):
        if c == 0:
            continue
        m = np.pad(lab == c, ((0, 0), (1, 1), (1, 1)))
        core = np.ones(lab.shape, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                core &= m[:, dy : dy + lab.shape[1], dx : dx + lab.shape[2]]
        shares.append(core.sum() / max(1, (lab == c).sum()))
    return float(min(shares)) if shares else 0.0


class Geometry(BaseModel):
    """Dimensionality, input scale, patch and network shape chosen for an image."""

    spatial_dims: int = 2
    input_scale: int
    patch: list[int]
    filters: list[int]
    reasons: list[str]


def choose_geometry(
    yx: tuple[int, int], accelerator: str, survival: float, *, depth: int = 1, aniso: float = math.inf
) -> Geometry:
    """Pick 2D or 3D, the input scale, the patch (in image pixels) and the network widths.

    3D when the stack has at least ``MIN_SLICES_3D`` slices and is close to isotropic (a slice
    step worth at most ``MAX_ANISOTROPY_3D`` pixels): the network then sees context across
    slices. Serial sections, time series and thin stacks are segmented slice by slice in 2D.

    In 2D, half resolution when the image is large and the strokes are thick enough to survive
    a 2x downsampling: the network then sees four times the area for the same cost, and context
    (a membrane vs a dark organelle) mattered more than the last pixel of detail on the
    ISBI strokes. Thin scribbles or small images keep full resolution.
    """
    d = DEFAULTS[accelerator]
    if is_volume(depth, aniso):
        patch = choose_patch((depth, *yx), d.patch3d)
        filters = choose_filters(patch, d.filters)
        return Geometry(
            spatial_dims=3, input_scale=1, patch=patch, filters=filters,
            reasons=[
                f"3D: {depth} slices, a slice step is worth {aniso:.1f} in-plane pixels (<= {MAX_ANISOTROPY_3D:g})",
                f"patch {patch[0]}x{patch[1]}x{patch[2]} voxels",
                f"DynUNet 3D widths {filters}: {len(filters) - 1} downsamplings keep a bottleneck of >= 8 voxels",
            ],
        )
    scale = 2 if min(yx) >= HALF_RES_MIN_SIZE and survival >= HALF_RES_MIN_SURVIVAL else 1
    reasons = []
    if depth > 1:
        why = (f"a slice step is worth {aniso:.1f} in-plane pixels (> {MAX_ANISOTROPY_3D:g})" if depth >= MIN_SLICES_3D
               else f"{depth} slices (< {MIN_SLICES_3D})")
        reasons.append(f"2D, slice by slice: {why}")
    reasons.append(
        f"input scale {scale}: "
        + (
            f"strokes are thick ({survival:.0%} of the thinnest class survive a 3x3 erosion) and the image is large"
            if scale == 2
            else f"stroke survival {survival:.0%} / image {yx[0]}x{yx[1]} -> full resolution"
        )
    )
    patch = choose_patch(yx, d.patch * scale, multiple=16 * scale)
    reasons.append(
        f"patch {patch[0]}x{patch[1]} image pixels"
        + ("" if patch == [d.patch * scale] * 2 else f" (image {yx[0]}x{yx[1]} is smaller than {d.patch * scale})")
    )
    filters = choose_filters([p // scale for p in patch], d.filters)
    reasons.append(f"DynUNet widths {filters}: {len(filters) - 1} downsamplings keep a bottleneck of >= 8 px")
    return Geometry(input_scale=scale, patch=patch, filters=filters, reasons=reasons)


def default_batch(geometry: Geometry, accelerator: str) -> int:
    """The device's starting batch for this geometry (``choose_batch`` then fits it to memory)."""
    d = DEFAULTS[accelerator]
    return d.batch3d if geometry.spatial_dims == 3 else d.batch


def infer_window(grid: tuple[int, ...], accelerator: str) -> list[int]:
    """The prediction window per axis of a 2D or 3D ``grid``: the device's side for that many axes.

    Not clipped to the training image: a model trained on 512 px slices predicts a 1024 px volume in
    one window per slice, not nine overlapping 512 px ones (2.25x the voxels: 0.48 s against 0.26 s
    a slice on one CPU thread). An image smaller than the side gets one window its own size
    (``tiling.window_grid``). Windows are not shrunk to overlap less: three of 416 px over a 1024 px
    axis, instead of three of 512, changed 2% of the labels of the same model.
    """
    d = DEFAULTS[accelerator]
    return [d.infer_roi3d if len(grid) == 3 else d.infer_roi] * len(grid)


def sample_bytes(patch: list[int], filters: list[int], input_scale: int = 1, value_bytes: int = 4) -> float:
    """Estimated activation memory of one training sample: every level's width times its voxels."""
    voxels = math.prod(max(1, p // input_scale) for p in patch)
    shrink = 2 ** len(patch)
    return ACTIVATIONS_PER_LEVEL * value_bytes * voxels * sum(f / shrink**level for level, f in enumerate(filters))


def choose_batch(default: int, patch: list[int], filters: list[int], input_scale: int, runtime: Runtime) -> tuple[int, str]:
    """Patches per step from the device's memory.

    A GPU gets the default batch scaled by its memory against ``REFERENCE_GPU_BYTES`` (a power
    of two, at most ``MAX_BATCH``); a CPU keeps the default, which its compute already limits.
    Either way the batch's estimated activations must fit ``ACTIVATION_MEMORY_SHARE`` of the
    device memory. Unknown memory keeps the default.

    Returns:
        (batch, the reason in words).
    """
    if runtime.memory_bytes <= 0:
        return default, f"batch {default} ({runtime.accelerator} default; device memory unknown)"
    gib = runtime.memory_bytes / 2**30
    wanted = default
    if runtime.accelerator == "cuda":
        scaled = default * runtime.memory_bytes / REFERENCE_GPU_BYTES
        wanted = int(min(MAX_BATCH, 2 ** math.floor(math.log2(max(1.0, scaled)))))
    value_bytes = 2 if runtime.precision in ("bf16-mixed", "16-mixed") else 4
    per_sample = sample_bytes(patch, filters, input_scale, value_bytes)
    fit = max(1, int(ACTIVATION_MEMORY_SHARE * runtime.memory_bytes // per_sample))
    batch = max(1, min(wanted, fit))
    why = f"batch {batch}: {gib:.0f} GiB {runtime.accelerator} memory, ~{per_sample / 2**20:.0f} MiB of activations per patch"
    if batch < wanted:
        why += f" (memory fits {fit})"
    return batch, why
