"""Self-configuration for sparse-label segmentation: image and labels in, a training plan out.

The rules (patch, depth, widths, batch, schedule) are a pure function of a data fingerprint
and of the measured step time (``derive_plan``); ``plan_segmentation`` gathers those two
and calls it. Every choice appends a line to ``reasons`` so the job log explains itself.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from pydantic import BaseModel

from dlorch.core.engine.segment.augment import AugmentConfig
from dlorch.core.engine.segment.calibrate import measure_seconds
from dlorch.core.engine.device import Runtime, detect_runtime, thread_candidates
from dlorch.core.engine.segment.holdout import split_strokes
from dlorch.core.engine.inputs import check_labels
from dlorch.core.engine.segment.intensity import IntensityStats, intensity_stats
from dlorch.core.engine.segment.sampling import max_val_tiles, val_cells


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
# A volume is segmented in 3D when it has enough slices and a slice step is worth at most this
# many in-plane pixels (nnU-Net treats a spacing ratio above 3 as anisotropic); else per slice in 2D.
MAX_ANISOTROPY_3D = 3.0
MIN_SLICES_3D = 16
# Steps the data "wants": past this the held-out score no longer improves on sparse strokes,
# so a fast GPU stops here instead of filling its budget.
WANTED_STEPS = 4000
PEAK_LR = 3e-3
# Half resolution needs an image of at least this size and strokes this thick (see choose_geometry).
HALF_RES_MIN_SIZE = 256
HALF_RES_MIN_SURVIVAL = 0.3
VAL_FRACTION = 0.15
# Share of the budget planned for training steps; the rest absorbs validation jitter and
# checkpoint writes on a shared machine. The time cap in training is the hard guarantee.
BUDGET_FILL = 0.92
# Test-time augmentation (8 flips/rotations, 8x the prediction) is on when its 7 extra passes are
# estimated to cost at most this share of the training time: on for a 2D stack (seconds next to
# minutes), off for a large 3D volume on a CPU, where it would add hours to minutes of training.
TTA_SHARE = 0.5
# Early stop at a plateau: on sparse strokes the held-out IoU peaks after a few hundred steps and
# then drifts down as the strokes are learnt by heart (ISBI, 600 s: 0.788 at epoch 9 of 66, 0.69 at
# the end), and the weights kept are the last within the select tolerance of the best (module.
# update_best): after epoch 22 of those 66 none was. Training ends once that rule has kept nothing
# for half as many epochs as the peak took (at least PLATEAU_MIN_EPOCHS), after at least
# PLATEAU_MIN_SHARE of the planned epochs. A peak is a rise of at least PLATEAU_MIN_GAIN.
PLATEAU_MIN_SHARE = 0.25
PLATEAU_MIN_EPOCHS = 3
PLATEAU_MIN_GAIN = 1e-3


def plateaued(epochs_done: int, kept_epochs: int, peak_epochs: int, planned_epochs: int) -> bool:
    """Whether training has stopped producing weights worth keeping (pure).

    Args:
        epochs_done: epochs trained so far (over resumes).
        kept_epochs: epochs trained when the weights now kept were taken.
        peak_epochs: epochs trained when the held-out IoU last rose to a new best.
        planned_epochs: the plan's epoch count.

    Returns:
        True once ``epochs_done - kept_epochs >= max(PLATEAU_MIN_EPOCHS, ceil(peak_epochs / 2))``
        and at least ``PLATEAU_MIN_SHARE`` of the planned epochs have run.
    """
    if peak_epochs < 1 or epochs_done < PLATEAU_MIN_SHARE * planned_epochs:
        return False
    return epochs_done - kept_epochs >= max(PLATEAU_MIN_EPOCHS, math.ceil(peak_epochs / 2))


def extended_epochs(planned: int, ceiling: int | None, epochs_done: int, train_seconds: float,
                    budget_s: float | None) -> int:
    """The epoch count once the epochs run so far have shown their real length (pure).

    A plan's epoch count is the budget divided by an epoch's length estimated from three timed
    steps. On a shared VM that estimate was 1.5x too long (0.353 s measured against 0.237 s per
    step in training), so 26 epochs ended 40% of a 600 s budget early while the held-out IoU still
    rose. Training therefore re-fits the count to the budget at every epoch end, from the mean
    length of the epochs so far (the first, with its warm-up, makes it err short), never beyond
    the data's step target and never below the plan: a slower machine is the time cap's business,
    and the learning rate anneals by time as well as by steps.

    Args:
        planned: the epoch count so far.
        ceiling: the data's step target in epochs (``SegmentationPlan.epochs_ceiling``); None: final.
        epochs_done: epochs trained over all resumes.
        train_seconds: their training seconds.
        budget_s: the time budget.
    """
    if ceiling is None or budget_s is None or epochs_done < 1 or train_seconds <= 0:
        return planned
    per_epoch = train_seconds / epochs_done
    fit = epochs_done + int(max(0.0, budget_s * BUDGET_FILL - train_seconds) // per_epoch)
    return max(planned, min(ceiling, fit))


class SegmentationPlan(BaseModel):
    """Everything training needs besides the data; JSON-serialisable and stored in checkpoints."""

    version: int = 1
    spatial_dims: int = 2  # 2: a (Z, Y, X) stack is segmented slice by slice; 3: as a volume
    anisotropy: float | None = None  # in-plane pixels one slice step is worth (anisotropy()); None for 2D images
    image_shape: list[int]
    num_classes: int  # K: labels are 1..K, predictions too
    class_pixels: list[int]  # painted pixels per class 1..K
    epochs: int
    steps_per_epoch: int
    time_budget_s: float | None
    patch_size: list[int]
    batch_size: int
    filters: list[int]  # DynUNet widths, one per level; depth = len(filters) - 1 downsamplings
    norm: str = "batch"
    input_scale: int = 1  # 2: the network runs on a 2x average-pooled image, logits upsampled back
    lr: float  # peak AdamW learning rate
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.02  # cosine decay ends at lr * this
    dice_weight: float = 1.0
    ema_decay: float = 0.99  # > 0: validate, keep and predict with an exponential moving average of the weights
    select_tolerance: float = 0.02  # a later epoch replaces the best if its held-out IoU is at most this much lower
    val_fraction: float
    intensity: IntensityStats  # of the training image (reference; prediction normalises per image)
    augment: AugmentConfig
    infer_roi: list[int]
    infer_overlap: float = 0.25
    infer_batch: int = 4
    tta: bool = False  # predict with test-time augmentation unless the caller says otherwise (choose_tta)
    stop_at_plateau: bool = False  # end training when the held-out strokes stop improving (plateaued())
    # The data's step target in epochs, where the time budget at the measured step time, not the
    # data, set ``epochs``: training raises ``epochs`` toward it when its epochs turn out faster than
    # measured (extended_epochs()). None: ``epochs`` is final.
    epochs_ceiling: int | None = None
    seed: int = 0
    train_prior: list[float] | None = None  # filled in from the checkpoint: class shares training saw
    planned_on: str  # accelerator the step time was measured on
    step_seconds: float | None  # measured seconds per training step (None when not measured)
    reasons: list[str]


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def choose_patch(image_yx: tuple[int, int], default: int, multiple: int = 16) -> list[int]:
    """Patch per axis: the device default, or the image size rounded up to ``multiple`` when smaller."""
    return [min(default, _round_up(max(int(d), multiple), multiple)) for d in image_yx]


def choose_filters(patch: list[int], default_filters: list[int]) -> list[int]:
    """Keep as many levels as leave a bottleneck of at least 8 pixels (and at least 3 levels: DynUNet's minimum)."""
    downsamplings = max(2, int(math.floor(math.log2(min(patch) / 8))))
    return list(default_filters[: min(len(default_filters), downsamplings + 1)])


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
    if depth >= MIN_SLICES_3D and aniso <= MAX_ANISOTROPY_3D:
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


def derive_plan(
    *,
    image_shape: tuple[int, ...],
    class_pixels: list[int],
    intensity: IntensityStats,
    runtime: Runtime,
    geometry: Geometry,
    val_tiles: int,
    val_strokes: int,
    step_seconds: float | None,
    eval_seconds: float | None,
    epochs: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    anisotropy_value: float | None = None,
) -> SegmentationPlan:
    """Pure planning rules; see ``plan_segmentation`` for the meaning of the overrides.

    Args:
        image_shape: (Z, Y, X) shape of the image stack.
        class_pixels: painted pixels of classes 1..K.
        intensity: statistics of the training image.
        runtime: the device the plan is for.
        geometry: input scale, patch and widths from ``choose_geometry``.
        val_tiles: validation tiles the held-back strokes produce.
        val_strokes: number of strokes held back.
        step_seconds: measured seconds per training step, or None if not measured.
        eval_seconds: measured seconds per forward-only batch, or None.
        epochs: user override of the epoch count.
        time_budget: user cap on training seconds.
        seed: seed of every random draw in training.
        anisotropy_value: the stack's measured anisotropy (recorded in the plan).

    Returns:
        The plan.
    """
    d = DEFAULTS[runtime.accelerator]
    reasons = [f"device {runtime.accelerator} ({runtime.cpu_threads} CPU threads), precision {runtime.precision}"]
    dims = geometry.spatial_dims
    grid = tuple(image_shape[-dims:])
    patch, filters = geometry.patch, geometry.filters
    reasons.extend(geometry.reasons)
    batch, why = choose_batch(default_batch(geometry, runtime.accelerator), patch, filters, geometry.input_scale,
                              runtime)
    reasons.append(f"{why}; classes drawn in equal shares, centred on painted pixels")
    infer_roi = infer_window(grid, runtime.accelerator)
    reasons.append(f"prediction window up to {'x'.join(map(str, infer_roi))} (an image's own size when smaller), "
                   "gaussian blending, overlap 0.25")
    reasons.append(
        f"{len(class_pixels)} classes, painted pixels {class_pixels}; {val_strokes} whole strokes "
        f"(~{VAL_FRACTION:.0%} per class) held back for validation"
    )
    reasons.append(f"intensity: clip to [{intensity.low:.4g}, {intensity.high:.4g}] then z-score, per image")

    step_s = step_seconds if step_seconds and step_seconds > 0 else None
    # An epoch is the checkpoint and stop-request interval: about epoch_s seconds, but on a
    # tiny image no more steps than it takes to cover every pixel about 4 times.
    cover = math.ceil(4 * math.prod(image_shape) / (batch * math.prod(patch)))
    by_time = round(d.epoch_s / step_s) if step_s else 100
    steps_per_epoch = int(np.clip(min(by_time, cover), 10, 250))
    if step_s:
        reasons.append(
            f"measured {step_s:.3f} s/step -> {steps_per_epoch} steps/epoch (~{d.epoch_s:.0f} s epochs"
            + (", capped by image size)" if cover < by_time else ")")
        )
    else:
        reasons.append(f"step time not measured -> {steps_per_epoch} steps/epoch")
    val_batches = math.ceil(val_tiles / batch) if val_tiles else 0
    epoch_s = steps_per_epoch * (step_s or 0.0) + val_batches * (eval_seconds or 0.0)

    ceiling = None
    if epochs is not None:
        n_epochs = int(epochs)
        budget = time_budget
        reasons.append(f"epochs {n_epochs}: user override")
    else:
        budget = time_budget if time_budget is not None else d.budget_s
        wanted = max(1, math.ceil(WANTED_STEPS / steps_per_epoch))
        if epoch_s > 0:
            fit = max(1, int(budget * BUDGET_FILL // epoch_s))
            n_epochs = min(wanted, fit)
            why = "the data's step target" if n_epochs == wanted else f"{budget:.0f} s budget at ~{epoch_s:.1f} s/epoch"
            reasons.append(f"epochs {n_epochs} (= {n_epochs * steps_per_epoch} steps): limited by {why}")
            if n_epochs < wanted:
                ceiling = wanted
                reasons.append(f"epochs re-fitted to the budget at every epoch end from their real length, up to "
                               f"{wanted} (the data's step target)")
        else:
            n_epochs = wanted
            reasons.append(f"epochs {n_epochs}: the data's step target of {WANTED_STEPS} steps")
    # An epoch count the user gave is run in full; an automatic one ends early at a plateau.
    stop_at_plateau = epochs is None and val_strokes > 0
    if stop_at_plateau:
        reasons.append("training ends early once no epoch's weights have been kept for half as many epochs as the "
                       f"held-out peak took (after at least {PLATEAU_MIN_SHARE:.0%} of the epochs)")
    if budget is not None:
        src = "user cap" if time_budget is not None else f"{runtime.accelerator} default"
        reasons.append(f"time budget {budget:.0f} s of training across resumes ({src}); lr anneals by time too")
    reasons.append(
        f"AdamW lr {PEAK_LR:g}, 3% warm-up then cosine to 2%; loss = CE + soft Dice on painted pixels only; "
        "weights averaged (EMA 0.99); best checkpoint by held-out stroke IoU, a later one within 0.02 preferred"
    )
    train_s = min(n_epochs * epoch_s, budget) if budget is not None else n_epochs * epoch_s
    tta, why = choose_tta(image_shape, dims, patch, batch, eval_seconds, train_s)
    reasons.append(why)
    return SegmentationPlan(
        image_shape=list(image_shape),
        num_classes=len(class_pixels),
        class_pixels=list(class_pixels),
        epochs=n_epochs,
        steps_per_epoch=steps_per_epoch,
        time_budget_s=budget,
        spatial_dims=dims,
        anisotropy=anisotropy_value,
        patch_size=patch,
        batch_size=batch,
        filters=filters,
        input_scale=geometry.input_scale,
        lr=PEAK_LR,
        val_fraction=VAL_FRACTION,
        intensity=intensity,
        augment=AugmentConfig(rot90=patch[-1] == patch[-2]),
        infer_roi=infer_roi,
        tta=tta,
        stop_at_plateau=stop_at_plateau,
        epochs_ceiling=ceiling,
        seed=seed,
        planned_on=runtime.accelerator,
        step_seconds=step_s,
        reasons=reasons,
    )


def choose_tta(image_shape: tuple[int, ...], dims: int, patch: list[int], batch: int,
               eval_seconds: float | None, train_seconds: float, overlap: float = 0.25) -> tuple[bool, str]:
    """Whether prediction averages the 8 in-plane flips/rotations by default, and why.

    The prediction time is estimated from the measured forward pass of a training batch, per
    voxel, times the image's voxels and the windows' overlap along each axis they tile. TTA is on
    when its 7 extra passes cost at most ``TTA_SHARE`` of the training time.
    """
    if not eval_seconds or not train_seconds:
        return False, "test-time augmentation off: prediction speed not measured"
    predict_s = eval_seconds / (batch * math.prod(patch)) * math.prod(image_shape) / (1 - overlap) ** dims
    extra = 7 * predict_s
    on = extra <= TTA_SHARE * train_seconds
    return on, (f"test-time augmentation {'on' if on else 'off'}: 8 flips/rotations would add ~{extra:.0f} s to "
                f"~{predict_s:.0f} s of prediction, {'within' if on else 'over'} {TTA_SHARE:.0%} of "
                f"~{train_seconds:.0f} s of training")


def plan_segmentation(
    image: np.ndarray, labels: np.ndarray, *, epochs: int | None = None, time_budget: float | None = None
) -> SegmentationPlan:
    """Plan sparse-label segmentation training for an image and its painted strokes.

    Args:
        image: (Y, X) image or (Z, Y, X) stack (a volume when close to isotropic, else 2D slices).
        labels: same shape, 0 = unlabelled, 1..K = classes.
        epochs: replaces the automatic epoch count.
        time_budget: caps total training seconds (across resumes); never lengthens training
            beyond what the data needs. Without either override a device default budget applies.

    Returns:
        The plan.

    Raises:
        ValueError: bad shapes or labels (see ``check_labels``), or non-positive overrides.
    """
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}; pass None for the automatic count")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget}; pass None for no cap")
    stack, lab, k = check_labels(image, labels)
    runtime = detect_runtime()
    counts = np.bincount(lab.reshape(-1), minlength=k + 1)[1:].tolist()
    stats = intensity_stats(stack)
    aniso = anisotropy(stack) if stack.shape[0] >= MIN_SLICES_3D else None
    geometry = choose_geometry(stack.shape[-2:], runtime.accelerator, stroke_survival(lab),
                               depth=stack.shape[0], aniso=math.inf if aniso is None else aniso)
    split = split_strokes(lab, VAL_FRACTION, seed=0, link_slices=geometry.spatial_dims == 3)
    patch = geometry.patch
    # Tiles are counted the way ValTiles cuts them: cells of half a patch holding a val pixel.
    cells = len(val_cells(split.val, patch))
    batch, _ = choose_batch(default_batch(geometry, runtime.accelerator), patch, geometry.filters,
                            geometry.input_scale, runtime)
    # Training picks the faster thread count every epoch (threads.py); plan with the faster too.
    timings = [
        measure_seconds(
            geometry.filters, patch, batch, k, replace(runtime, cpu_threads=n),
            input_scale=geometry.input_scale,
        )
        for n in thread_candidates(runtime)
    ]
    step_s, eval_s = min(timings)
    return derive_plan(
        image_shape=stack.shape,
        class_pixels=counts,
        intensity=stats,
        runtime=runtime,
        geometry=geometry,
        val_tiles=min(cells, max_val_tiles(patch)),
        val_strokes=split.val_strokes,
        step_seconds=step_s,
        eval_seconds=eval_s,
        epochs=epochs,
        time_budget=time_budget,
        anisotropy_value=aniso if aniso is not None and math.isfinite(aniso) else None,
    )
