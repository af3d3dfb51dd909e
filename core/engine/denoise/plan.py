"""Self-configuration for denoising: image (and target) in, a JSON-serialisable training plan out.

The rules (patch, widths, batch, blind spot, schedule) are a pure function of the data's
shape and statistics and of the measured step time (``derive_denoising_plan``);
``plan_denoising`` gathers those and calls it. Every choice adds a line to ``reasons``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel

from dlorch.core.engine.anisotropy import is_volume, stack_anisotropy
from dlorch.core.engine.calibrate import settled_seconds, time_steps
from dlorch.core.engine.denoise.blindspot import mask_density, masked_mse
from dlorch.core.engine.denoise.data import GRID, MAX_VAL_TILES, choose_holdout
from dlorch.core.engine.denoise.intensity import mean_std
from dlorch.core.engine.device import Runtime, detect_runtime
from dlorch.core.engine.inputs import check_denoising_inputs
from dlorch.core.engine.network import build_unet, choose_filters, memory_format
from dlorch.core.engine.schedule import EpochRules, check_overrides, plan_schedule
from dlorch.core.engine.tiling import window_reason


class DenoiseDefaults(BaseModel):
    """Starting points per accelerator, shrunk by the rules to fit the data."""

    patch: int
    batch: int
    filters: list[int]
    lr: float
    infer_roi: int
    budget_s: float  # training seconds when the user gives neither epochs nor a budget
    epoch_s: float  # target length of one epoch: bounds how late a stop request is honoured
    wanted_steps: int  # past this many steps a denoiser barely improves; a fast GPU stops there
    patch3d: int  # cube side of a 3D patch (volumes close to isotropic)
    batch3d: int
    infer_roi3d: int


DEFAULTS = {
    # Noise2Void learns from ~2% of the pixels a step sees, so on a 2-core CPU the number of
    # steps limits quality more than width: narrow levels (about 2.5x the steps of a
    # [32, 64, 128] net in the same time) but 4 of them, for context around each pixel.
    "cpu": DenoiseDefaults(patch=64, batch=8, filters=[16, 32, 64, 128], lr=4e-3, infer_roi=1024, budget_s=600,
                           epoch_s=20, wanted_steps=6000, patch3d=32, batch3d=4, infer_roi3d=64),
    "cuda": DenoiseDefaults(patch=128, batch=32, filters=[32, 64, 128, 256], lr=2e-3, infer_roi=1024, budget_s=1800,
                            epoch_s=30, wanted_steps=20000, patch3d=64, batch3d=8, infer_roi3d=128),
}
# Blind spot: one masked pixel per 7x7 cell (~2%, the top of the usual 0.2-2% range: more
# signal per step, which is what a CPU lacks) replaced by a random pixel of its 5x5 window.
BLINDSPOT_CELL = 7
BLINDSPOT_RADIUS = 2
# In 3D one voxel per 4x4x4 cell (~1.6%), from its 5x5x5 window.
BLINDSPOT_CELL_3D = 4
# Epochs are planned for this multiple of the budget: the step time is the fastest one
# measured, but validation and checkpoint writes add a little; the time cap ends training
# when the machine is slower (the lr anneals by time share too).
BUDGET_STRETCH = 1.1
# How denoising turns step time into epochs (schedule.py): an epoch sees every training pixel
# at most about 8 times; the epochs fill BUDGET_STRETCH x the budget.
EPOCH_RULES = EpochRules(cover_passes=8, unmeasured_steps=50, min_steps=5, budget_fill=BUDGET_STRETCH, refit=False,
                         target="the step target")
MODE_WORDS = {"n2v": "Noise2Void (noisy image alone)", "n2n": "Noise2Noise (two noisy acquisitions)",
              "care": "CARE (clean target)"}


class DenoisingPlan(BaseModel):
    """Everything denoising training needs besides the data; JSON-serialisable and stored in checkpoints."""

    version: int = 1
    mode: Literal["n2v", "n2n", "care"]  # n2v: noisy image alone; n2n: two noisy acquisitions; care: clean target
    spatial_dims: int = 2  # 2: a (Z, Y, X) stack is denoised slice by slice; 3: as a volume
    image_shape: list[int]  # (Z, Y, X) of the training stack
    epochs: int
    steps_per_epoch: int
    time_budget_s: float | None
    patch_size: list[int]
    batch_size: int
    filters: list[int]  # DynUNet widths, one per level
    norm: str = "batch"
    lr: float  # peak AdamW learning rate
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.02  # cosine decay ends at lr * this
    blindspot_cell: int | None  # n2v: one masked pixel per cell x cell block; None otherwise
    blindspot_radius: int | None  # n2v: replacement drawn from the (2r+1)^2 window minus its centre
    posterior: bool = False  # n2v: recombine the prediction with the noisy pixel (posterior.py)
    classical: bool = False  # n2v: blend with collaborative filtering by SURE in whole-image prediction (sure.py)
    input_mean: float  # normalisation of the network input: (x - mean) / std, no clipping
    input_std: float
    target_mean: float  # the output is un-normalised with these: y * std + mean
    target_std: float
    val_slices: list[int]  # slices held out for validation ...
    val_rows: int  # ... or else rows held out at the bottom of every slice (0: no validation)
    infer_roi: list[int]
    infer_overlap: float = 0.25
    infer_batch: int = 4
    seed: int = 0
    planned_on: str  # accelerator the step time was measured on
    step_seconds: float | None  # measured seconds per training step (None when not measured)
    reasons: list[str]


def denoising_geometry(
    shape: tuple[int, int, int], d: DenoiseDefaults, dims: int
) -> tuple[list[int], int, tuple[int, ...], list[int], int]:
    """Hold-out, training region, patch and batch of a (Z, Y, X) stack denoised in ``dims`` D.

    A volume keeps its slices together (a held-out slice would cut it): a band of rows instead.

    Returns:
        (val_slices, val_rows, training region, patch, batch).
    """
    z, y, x = shape
    val_slices, val_rows = choose_holdout((1, y, x) if dims == 3 else (z, y, x))
    region = (z, y - val_rows, x) if dims == 3 else (y - val_rows, x)
    patch = choose_patch(region, d.patch3d if dims == 3 else d.patch)
    return val_slices, val_rows, region, patch, d.batch3d if dims == 3 else d.batch


def choose_patch(extent_yx: tuple[int, ...], default: int) -> list[int]:
    """Patch per axis: the device default, or the training extent rounded down to 16 (at least 16)."""
    return [max(GRID, min(default, GRID * (int(d) // GRID))) for d in extent_yx]


def holdout_reason(val_slices: list[int], val_rows: int, z: int) -> str:
    """The plan's line about what validation holds out."""
    if val_slices:
        return f"validation: slices {val_slices} held out ({len(val_slices)} of {z}); best weights by their loss"
    if val_rows:
        return f"validation: bottom {val_rows} rows of every slice held out; best weights by their loss"
    return "validation: image too small to hold anything out; the latest weights are kept"


def patch_reason(patch: list[int], default_side: int, region: tuple[int, ...], dims: int) -> str:
    """The plan's line about the patch and the augmentation it allows."""
    small = f"training region {'x'.join(map(str, region))} is small"
    return (
        f"patch {'x'.join(map(str, patch))}: "
        + ("device default" if patch == [default_side] * dims else small)
        + "; augmented by flips" + (" and 90° rotations" if patch[-1] == patch[-2] else " (non-square: no rotations)")
        + (" in-plane" if dims == 3 else "")
    )


def loss_rule(mode: str, dims: int) -> tuple[int | None, int | None, list[str]]:
    """The blind spot of Noise2Void (cell and radius) or none, and the plan's lines about the loss.

    Returns:
        (blind-spot cell, radius, reasons); the cell and radius are None for n2n and care.
    """
    if mode != "n2v":
        swap = ", input and target swapped at random" if mode == "n2n" else ""
        return None, None, [f"loss: mean squared error on every pixel{swap}"]
    cell, radius = (BLINDSPOT_CELL_3D if dims == 3 else BLINDSPOT_CELL), BLINDSPOT_RADIUS
    box = "x".join([str(cell)] * dims)
    window = "x".join([str(2 * radius + 1)] * dims)
    return cell, radius, [
        f"blind spot: 1 pixel per {box} cell masked ({mask_density(cell, dims):.2%}), replaced by a random "
        f"other pixel of its {window} window; loss on masked pixels only",
        "prediction: Gaussian posterior mean of the blind-spot output and the noisy pixel, noise level "
        "estimated from the image (keeps the detail a pixel's neighbours cannot predict)",
        "whole images: blended slice by slice with collaborative filtering (BM3D's algorithm) at the noise std "
        "estimated from the image, the share chosen by Stein's unbiased risk estimate",
    ]


def validation_tiles(shape: tuple[int, int, int], patch: list[int], val_slices: list[int], val_rows: int,
                     dims: int) -> int:
    """How many tiles validation runs at every epoch end (``data.ValTiles`` cuts them), at most ``MAX_VAL_TILES``."""
    z, y, x = shape
    if dims == 3:
        return min(MAX_VAL_TILES, max(1, x // patch[-1]) * max(1, z // patch[0])) if val_rows else 0
    return min(MAX_VAL_TILES, len(val_slices) * max(1, (y // patch[0]) * (x // patch[1])) if val_slices
               else (max(1, x // patch[1]) * z if val_rows else 0))


def derive_denoising_plan(
    *,
    image_shape: tuple[int, int, int],
    mode: str,
    runtime: Runtime,
    spatial_dims: int = 2,
    input_stats: tuple[float, float],
    target_stats: tuple[float, float],
    step_seconds: float | None,
    eval_seconds: float | None,
    epochs: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
) -> DenoisingPlan:
    """Pure planning rules; see ``plan_denoising`` for the meaning of the overrides.

    Args:
        image_shape: (Z, Y, X) of the image stack.
        mode: "n2v", "n2n" or "care" (already resolved).
        runtime: the device the plan is for.
        spatial_dims: 3 to denoise the stack as a volume (see ``plan_denoising``), else 2.
        input_stats: (mean, std) the network input is normalised with.
        target_stats: (mean, std) of the target; the output is un-normalised with them.
        step_seconds, eval_seconds, epochs, time_budget: as for ``schedule.plan_schedule``.
        seed: seed of every random draw in training.

    Returns:
        The plan.
    """
    d = DEFAULTS[runtime.accelerator]
    z, y, x = image_shape
    dims = spatial_dims
    val_slices, val_rows, region, patch, batch = denoising_geometry((z, y, x), d, dims)
    filters = choose_filters(patch, d.filters)
    cell, radius, loss_reasons = loss_rule(mode, dims)
    # Not clipped to this image: a larger volume predicted later gets windows of up to this side
    # (a 1024x1024 slice on one CPU thread: one window 1.26 s, nine of 512 px 2.07 s).
    infer_roi = [d.infer_roi3d if dims == 3 else d.infer_roi] * dims
    reasons = [
        runtime.describe(),
        f"mode {mode}: {MODE_WORDS[mode]}; {z} slice(s) of {y}x{x}, denoised "
        + ("as a volume in 3D" if dims == 3 else "slice by slice in 2D"),
        holdout_reason(val_slices, val_rows, z),
        patch_reason(patch, d.patch3d if dims == 3 else d.patch, region, dims),
        f"DynUNet widths {filters}, batch norm: {len(filters) - 1} downsamplings, bottleneck >= 8 px",
        f"batch {batch} patches per step ({runtime.accelerator} default)",
        *loss_reasons,
        f"normalisation: input (x - {input_stats[0]:.4g}) / {input_stats[1]:.4g}, output un-normalised with "
        f"target mean {target_stats[0]:.4g} / std {target_stats[1]:.4g}; no clipping",
        window_reason(infer_roi),
    ]
    schedule = plan_schedule(
        rules=EPOCH_RULES, accelerator=runtime.accelerator, epoch_s=d.epoch_s, default_budget_s=d.budget_s,
        wanted_steps=d.wanted_steps, train_pixels=max(1, (z - len(val_slices)) * (y - val_rows) * x), patch=patch,
        batch=batch, val_tiles=validation_tiles((z, y, x), patch, val_slices, val_rows, dims),
        step_seconds=step_seconds, eval_seconds=eval_seconds, epochs=epochs, time_budget=time_budget,
    )
    return DenoisingPlan(
        mode=mode, spatial_dims=dims, image_shape=[z, y, x], epochs=schedule.epochs,
        steps_per_epoch=schedule.steps_per_epoch, time_budget_s=schedule.time_budget_s, patch_size=patch,
        batch_size=batch, filters=filters, lr=d.lr, blindspot_cell=cell, blindspot_radius=radius,
        posterior=mode == "n2v", classical=mode == "n2v", input_mean=input_stats[0], input_std=input_stats[1],
        target_mean=target_stats[0], target_std=target_stats[1], val_slices=val_slices, val_rows=val_rows,
        infer_roi=infer_roi, seed=seed,
        planned_on=runtime.accelerator, step_seconds=schedule.step_seconds,
        reasons=[*reasons, *schedule.reasons, f"AdamW lr {d.lr:g}, 3% warm-up then cosine to 2%"],
    )


def plan_denoising(
    image: np.ndarray,
    target: np.ndarray | None = None,
    *,
    epochs: int | None = None,
    time_budget: float | None = None,
    mode: str | None = None,
    voxel_size: tuple[float, ...] | None = None,
) -> DenoisingPlan:
    """Plan denoising training for an image (and optionally its target).

    Args:
        image: (Y, X) image or (Z, Y, X) stack of 2D slices, any real dtype.
        target: None (Noise2Void), or an array of the image's shape: a second noisy
            acquisition (mode "n2n") or a clean image (mode "care", the default with a target).
        epochs: replaces the automatic epoch count.
        time_budget: caps total training seconds (across resumes). Without either override a
            device default budget applies (CPU 600 s, CUDA 1800 s).
        mode: "n2v", "n2n", "care", or None for automatic.
        voxel_size: the file's physical voxel size (Z, Y, X), which decides 2D or 3D where given;
            else the anisotropy is measured (``anisotropy.stack_anisotropy``).

    Returns:
        The plan.

    Raises:
        ValueError: bad shapes or values, a mode that does not fit the target, or
            non-positive overrides.
    """
    check_overrides(epochs, time_budget)
    stack, target_stack, mode = check_denoising_inputs(image, target, mode)
    if mode == "n2v":
        input_stats = target_stats = mean_std(stack)
    elif mode == "n2n":
        # One normalisation for both acquisitions: they trade places as input and target.
        input_stats = target_stats = mean_std(stack, target_stack)
    else:
        input_stats, target_stats = mean_std(stack), mean_std(target_stack)
    runtime = detect_runtime()
    d = DEFAULTS[runtime.accelerator]
    # A volume close to isotropic is denoised in 3D (the same rule as segmentation's).
    aniso, aniso_why = stack_anisotropy(stack, voxel_size)  # the file's voxel size, where it gives one
    dims = 3 if is_volume(stack.shape[0], aniso) else 2
    _, _, _, patch, batch = denoising_geometry(stack.shape, d, dims)
    filters = choose_filters(patch, d.filters)
    step_s, eval_s = measure_step_seconds(filters, patch, batch, "batch", runtime)
    # The same command plans the same epochs: the measurement settles on this machine's record.
    step_s, eval_s = settled_seconds(f"denoise|{patch}|{batch}|{filters}", runtime, step_s, eval_s)
    plan = derive_denoising_plan(image_shape=stack.shape, mode=mode, runtime=runtime, spatial_dims=dims,
                                 input_stats=input_stats, target_stats=target_stats, step_seconds=step_s,
                                 eval_seconds=eval_s, epochs=epochs, time_budget=time_budget)
    return plan if stack.shape[0] == 1 else plan.model_copy(update={"reasons": [*plan.reasons[:2], aniso_why,
                                                                               *plan.reasons[2:]]})


def measure_step_seconds(
    filters: list[int],
    patch: list[int],
    batch: int,
    norm: str,
    runtime: Runtime,
    min_seconds: float = 2.0,
    min_steps: int = 3,
    max_steps: int = 40,
) -> tuple[float, float]:
    """Seconds of a training step and of a forward-only (validation) batch of the planned network.

    The fastest of the steps run over a short window is taken, not the median of two or three:
    on a machine shared with other jobs a burst of contention once made three steps 30x slower
    than usual, and a plan built on that number used a quarter of its budget. Contention only
    ever lengthens steps, and the time cap in training covers a machine slower than measured.

    Args:
        filters: DynUNet widths.
        patch: patch size, 2D (Y, X) or 3D (Z, Y, X).
        batch: batch size.
        norm: MONAI norm name.
        runtime: where to measure.
        min_seconds, min_steps, max_steps: how long to measure (``calibrate.time_steps``).

    Returns:
        (seconds per training step, seconds per forward-only batch), the fastest of each.
    """
    layout = memory_format(len(patch) + 2)

    def setup(device: torch.device):
        net = build_unet(len(patch), 1, 1, filters, norm).to(device).to(memory_format=layout)
        x = torch.randn(batch, 1, *patch, device=device).contiguous(memory_format=layout)
        weight = (torch.rand(batch, 1, *patch, device=device) < 0.02).float()
        return net, x, lambda out: masked_mse(out, x, weight)

    train_times, eval_times = time_steps(runtime, setup, min_steps=min_steps, min_seconds=min_seconds,
                                         max_steps=max_steps)
    return min(train_times), min(eval_times)
