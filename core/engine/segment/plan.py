"""Self-configuration for sparse-label segmentation: image and labels in, a training plan out.

The rules (patch, depth, widths, batch, schedule) are a pure function of a data fingerprint
and of the measured step time (``derive_plan``); ``plan_segmentation`` gathers those two
and calls it. Every choice appends a line to ``reasons`` so the job log explains itself.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from pydantic import BaseModel

from dlorch.core.engine.anisotropy import stack_anisotropy
from dlorch.core.engine.calibrate import settled_seconds, time_steps
from dlorch.core.engine.device import Runtime, detect_runtime, thread_candidates
from dlorch.core.engine.inputs import check_labels
from dlorch.core.engine.network import build_unet
from dlorch.core.engine.schedule import EpochRules, check_overrides, plan_schedule
from dlorch.core.engine.segment.augment import AugmentConfig
from dlorch.core.engine.segment.geometry import (DEFAULTS, Geometry, choose_batch, choose_geometry, default_batch,
                                                 infer_window, stroke_survival)
from dlorch.core.engine.segment.holdout import split_strokes
from dlorch.core.engine.segment.intensity import IntensityStats, intensity_stats
from dlorch.core.engine.segment.losses import sparse_ce_dice_loss
from dlorch.core.engine.segment.sampling import max_val_tiles, val_cells
from dlorch.core.engine.tiling import window_reason


# Steps the data "wants": past this the held-out score no longer improves on sparse strokes,
# so a fast GPU stops here instead of filling its budget.
WANTED_STEPS = 4000
PEAK_LR = 3e-3
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
# the end), and the weights kept are the mean of those within the select tolerance of the best
# (SegmentationModule.keep_if_best): after epoch 22 of those 66 none was. Training ends once that
# rule has kept nothing for half as many epochs as the peak took (at least PLATEAU_MIN_EPOCHS),
# after at least PLATEAU_MIN_SHARE of the planned epochs. A peak is a rise of at least PLATEAU_MIN_GAIN.
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
    select_tolerance: float = 0.02  # epochs whose held-out IoU is at most this much below the best are averaged and kept
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
    # Loss weight of accepted labels (accepted.py) relative to painted ones; None: the job has none.
    accepted_weight: float | None = None
    warm_start: bool = False  # training starts from another model's weights (warmstart.py)
    train_prior: list[float] | None = None  # filled in from the checkpoint: class shares training saw
    planned_on: str  # accelerator the step time was measured on
    step_seconds: float | None  # measured seconds per training step (None when not measured)
    reasons: list[str]


# How segmentation turns step time into epochs (schedule.py): an epoch covers the image at most
# about 4 times; the epochs fill BUDGET_FILL of the budget. They are not re-fitted from the epochs'
# real length as training runs: that count followed the stopwatch, and the same command then
# trained a different number of epochs each time (ISBI: 0.658 to 0.706 mean IoU over three runs).
EPOCH_RULES = EpochRules(cover_passes=4, unmeasured_steps=100, min_steps=10, budget_fill=BUDGET_FILL, refit=False,
                         target="the data's step target")
PLATEAU_REASON = ("training ends early once no epoch's weights have been kept for half as many epochs as the "
                  f"held-out peak took (after at least {PLATEAU_MIN_SHARE:.0%} of the epochs)")
TRAINING_REASON = (
    f"AdamW lr {PEAK_LR:g}, 3% warm-up then cosine to 2%; loss = CE + soft Dice on painted pixels only; "
    "weights averaged (EMA 0.99); kept: the mean of the epochs within 0.02 of the best held-out stroke IoU"
)


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
        geometry: dimensionality, input scale, patch and widths from ``choose_geometry``.
        val_tiles: validation tiles the held-back strokes produce.
        val_strokes: number of strokes held back.
        step_seconds, eval_seconds, epochs, time_budget: as for ``schedule.plan_schedule``.
        seed: seed of every random draw in training.
        anisotropy_value: the stack's measured anisotropy (recorded in the plan).

    Returns:
        The plan.
    """
    d = DEFAULTS[runtime.accelerator]
    dims, patch = geometry.spatial_dims, geometry.patch
    batch, why = choose_batch(default_batch(geometry, runtime.accelerator), patch, geometry.filters,
                              geometry.input_scale, runtime)
    infer_roi = infer_window(tuple(image_shape[-dims:]), runtime.accelerator)
    reasons = [
        runtime.describe(),
        *geometry.reasons,
        f"{why}; classes drawn in equal shares, centred on painted pixels",
        window_reason(infer_roi),
        f"{len(class_pixels)} classes, painted pixels {class_pixels}; {val_strokes} whole strokes "
        f"(~{VAL_FRACTION:.0%} per class) held back for validation",
        f"intensity: clip to [{intensity.low:.4g}, {intensity.high:.4g}] then z-score, per image",
    ]
    # An epoch count the user gave is run in full; an automatic one ends early at a plateau.
    schedule = plan_schedule(
        rules=EPOCH_RULES, accelerator=runtime.accelerator, epoch_s=d.epoch_s, default_budget_s=d.budget_s,
        wanted_steps=WANTED_STEPS, train_pixels=math.prod(image_shape), patch=patch, batch=batch, val_tiles=val_tiles,
        step_seconds=step_seconds, eval_seconds=eval_seconds, epochs=epochs, time_budget=time_budget,
        early_stop=PLATEAU_REASON if val_strokes > 0 else None,
    )
    train_s = schedule.epochs * schedule.epoch_seconds
    if schedule.time_budget_s is not None:
        train_s = min(train_s, schedule.time_budget_s)
    tta, tta_why = choose_tta(image_shape, dims, patch, batch, eval_seconds, train_s)
    return SegmentationPlan(
        image_shape=list(image_shape), num_classes=len(class_pixels), class_pixels=list(class_pixels),
        epochs=schedule.epochs, steps_per_epoch=schedule.steps_per_epoch, time_budget_s=schedule.time_budget_s,
        spatial_dims=dims, anisotropy=anisotropy_value, patch_size=patch, batch_size=batch, filters=geometry.filters,
        input_scale=geometry.input_scale, lr=PEAK_LR, val_fraction=VAL_FRACTION, intensity=intensity,
        augment=AugmentConfig(rot90=patch[-1] == patch[-2]), infer_roi=infer_roi, tta=tta,
        stop_at_plateau=schedule.early_stop, epochs_ceiling=schedule.epochs_ceiling, seed=seed,
        planned_on=runtime.accelerator, step_seconds=schedule.step_seconds,
        reasons=[*reasons, *schedule.reasons, TRAINING_REASON, tta_why],
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
    image: np.ndarray, labels: np.ndarray, *, epochs: int | None = None, time_budget: float | None = None,
    voxel_size: tuple[float, ...] | None = None,
) -> SegmentationPlan:
    """Plan sparse-label segmentation training for an image and its painted strokes.

    Args:
        image: (Y, X) image or (Z, Y, X) stack (a volume when close to isotropic, else 2D slices).
        labels: same shape, 0 = unlabelled, 1..K = classes.
        epochs: replaces the automatic epoch count.
        time_budget: caps total training seconds (across resumes); never lengthens training
            beyond what the data needs. Without either override a device default budget applies.
        voxel_size: the file's physical voxel size (Z, Y, X), which decides 2D or 3D where given;
            else the anisotropy is measured (``anisotropy.stack_anisotropy``).

    Returns:
        The plan.

    Raises:
        ValueError: bad shapes or labels (see ``check_labels``), or non-positive overrides.
    """
    check_overrides(epochs, time_budget)
    stack, lab, k = check_labels(image, labels)
    runtime = detect_runtime()
    aniso, aniso_why = stack_anisotropy(stack, voxel_size)
    geometry = choose_geometry(stack.shape[-2:], runtime.accelerator, stroke_survival(lab),
                               depth=stack.shape[0], aniso=aniso)
    if stack.shape[0] > 1:
        geometry = geometry.model_copy(update={"reasons": [aniso_why, *geometry.reasons]})
    split = split_strokes(lab, VAL_FRACTION, seed=0, link_slices=geometry.spatial_dims == 3)
    patch = geometry.patch
    # Tiles are counted the way ValTiles cuts them: cells of half a patch holding a val pixel.
    cells = len(val_cells(split.val, patch))
    batch, _ = choose_batch(default_batch(geometry, runtime.accelerator), patch, geometry.filters,
                            geometry.input_scale, runtime)
    # Training picks the faster thread count every epoch (threads.py); plan with the faster too.
    timings = [
        measure_seconds(geometry.filters, patch, batch, k, replace(runtime, cpu_threads=n),
                        input_scale=geometry.input_scale)
        for n in thread_candidates(runtime)
    ]
    step_s, eval_s = min(timings)
    # The same command plans the same epochs: the measurement settles on this machine's record.
    step_s, eval_s = settled_seconds(f"segment|{patch}|{batch}|{geometry.filters}|{k}|{geometry.input_scale}",
                                     runtime, step_s, eval_s)
    return derive_plan(
        image_shape=stack.shape,
        class_pixels=np.bincount(lab.reshape(-1), minlength=k + 1)[1:].tolist(),
        intensity=intensity_stats(stack),
        runtime=runtime,
        geometry=geometry,
        val_tiles=min(cells, max_val_tiles(patch)),
        val_strokes=split.val_strokes,
        step_seconds=step_s,
        eval_seconds=eval_s,
        epochs=epochs,
        time_budget=time_budget,
        anisotropy_value=aniso if math.isfinite(aniso) else None,
    )


def measure_seconds(filters: list[int], patch: list[int], batch: int, num_classes: int, runtime: Runtime,
                    repeats: int = 3, input_scale: int = 1) -> tuple[float, float]:
    """Seconds of a training step and of a forward-only (validation) batch of the planned network.

    Args:
        filters: network widths.
        patch: patch size, 2D (Y, X) or 3D (Z, Y, X).
        batch: batch size.
        num_classes: output channels.
        runtime: where to measure.
        repeats: timed steps after one warm-up step (``calibrate.time_steps``).
        input_scale: the plan's input scale.

    Returns:
        (seconds per training step, seconds per forward-only batch), the fastest of the timed ones: a
        process just started, or another one busy for a moment, only ever makes a step slower, and the
        first run on a new machine must plan the epochs the next runs plan.
    """

    def setup(device: torch.device):
        net = build_unet(len(patch), 1, num_classes, filters, input_scale=input_scale).to(device)
        x = torch.randn(batch, 1, *patch, device=device)
        y = torch.randint(0, num_classes + 1, (batch, 1, *patch), device=device)
        return net, x, lambda out: sparse_ce_dice_loss(out, y)

    train_times, eval_times = time_steps(runtime, setup, min_steps=repeats)
    return min(train_times), min(eval_times)
