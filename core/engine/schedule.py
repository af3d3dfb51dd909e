"""The training schedule both tasks plan: steps per epoch, the epoch count under a time budget, and why.

An epoch is the checkpoint and stop-request interval, so its length is set in seconds from the
measured step time. The epoch count is the task's step target, or as many epochs as the time
budget holds where that is fewer. Every choice adds a line to the plan's ``reasons``. Pure.

The same command must give the same answer, so the plan may not follow the noise of a stopwatch:
a measured step time is snapped onto a coarse grid (``STEP_GRID``: 4 points per doubling) before
anything is derived from it, and a value this machine settled on before is kept unless a new
measurement is more than ``STEP_HYSTERESIS`` times faster (``settle_step_seconds``). Steps per epoch and
the epoch count are then the same from run to run; the time budget stays a cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_STEPS_PER_EPOCH = 250
# Measured step times are snapped to 2 ** (k / STEP_GRID) seconds: a plan changes only when the
# machine is ~19 % faster or slower, not with the few percent a shared CPU jitters by.
STEP_GRID = 4
# A step time settled on before is kept unless a new measurement is faster by more than this
# factor: a measurement near a grid boundary would otherwise flip between the two neighbours. A
# slower measurement never replaces it: contention on a shared machine only ever lengthens steps
# (an ISBI plan made next to two other trainings measured 9.5 s a step, 40x the idle machine's,
# and trained 20 steps), and the time cap covers a machine that really got slower.
STEP_HYSTERESIS = 1.3


def snap_step_seconds(step_s: float) -> float:
    """The grid point (2 ** (k / STEP_GRID) seconds) nearest to ``step_s`` on a log scale (pure)."""
    k = round(math.log2(step_s) * STEP_GRID)
    return float(2.0 ** (k / STEP_GRID))


def settle_step_seconds(measured: float | None, previous: float | None = None) -> float | None:
    """The step time a plan is derived from: ``previous`` unless ``measured`` is clearly faster, else snapped.

    Args:
        measured: seconds per step just measured, or None (not measured).
        previous: the value settled on for the same network on this machine before, or None.

    Returns:
        A grid value (or None when nothing was measured).
    """
    if not measured or measured <= 0:
        return None
    if previous and previous > 0 and measured * STEP_HYSTERESIS >= previous:
        return float(previous)
    return snap_step_seconds(measured)


@dataclass(frozen=True)
class EpochRules:
    """A task's constants for turning step time into epochs."""

    cover_passes: int  # an epoch has no more steps than it takes to cover the training pixels this often
    unmeasured_steps: int  # steps per epoch when the step time was not measured
    min_steps: int  # fewest steps per epoch
    budget_fill: float  # epochs are planned for this multiple of the budget (the time cap is the guarantee)
    refit: bool  # training re-fits a budget-limited count from the epochs' real length (``epochs_ceiling``)
    target: str  # the step target in words, e.g. "the data's step target"


@dataclass
class Schedule:
    """Steps per epoch, epochs and time budget of a plan, with the reasons for them."""

    steps_per_epoch: int
    epochs: int
    time_budget_s: float | None
    epochs_ceiling: int | None  # the step target in epochs, where the budget set a lower count and rules.refit
    early_stop: bool  # the task's early stop applies (an automatic count; see ``plan_schedule``)
    step_seconds: float | None  # the measured step time, None when not measured
    epoch_seconds: float  # estimated seconds of one epoch with its validation; 0 when not measured
    reasons: list[str]


def check_overrides(epochs: int | None, time_budget: float | None) -> None:
    """Raise a one-line ValueError for an epoch count below 1 or a time budget that is not positive."""
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}; pass None for the automatic count")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget}; pass None for no cap")


def steps_per_epoch(step_s: float | None, epoch_s: float, cover: int, rules: EpochRules) -> tuple[int, str]:
    """Steps of about ``epoch_s`` seconds at ``step_s`` per step, at most ``cover``; and the reason."""
    by_time = round(epoch_s / step_s) if step_s else rules.unmeasured_steps
    steps = int(np.clip(min(by_time, cover), rules.min_steps, MAX_STEPS_PER_EPOCH))
    if not step_s:
        return steps, f"step time not measured -> {steps} steps/epoch"
    capped = ", capped by image size)" if cover < by_time else ")"
    return steps, (f"step time {step_s:.3f} s (measured, on a grid of {STEP_GRID} points per doubling) -> "
                   f"{steps} steps/epoch (~{epoch_s:.0f} s epochs{capped}")


def epoch_count(steps: int, epoch_s: float, budget: float, wanted_steps: int, rules: EpochRules
                ) -> tuple[int, int | None, list[str]]:
    """The automatic epoch count: the step target, or fewer where the budget holds fewer.

    Returns:
        (epochs, the ceiling training may re-fit up to or None, reasons).
    """
    wanted = max(1, math.ceil(wanted_steps / steps))
    if epoch_s <= 0:
        return wanted, None, [f"epochs {wanted}: {rules.target} of {wanted_steps} steps"]
    n_epochs = min(wanted, max(1, int(budget * rules.budget_fill // epoch_s)))
    if n_epochs == wanted:
        why = rules.target
    elif rules.budget_fill > 1:
        why = f"{rules.budget_fill:g} x the {budget:.0f} s budget at ~{epoch_s:.1f} s/epoch; the time cap ends it"
    else:
        why = f"{budget:.0f} s budget at ~{epoch_s:.1f} s/epoch"
    reasons = [f"epochs {n_epochs} (= {n_epochs * steps} steps): limited by {why}"]
    if n_epochs == wanted or not rules.refit:
        return n_epochs, None, reasons
    reasons.append(f"epochs re-fitted to the budget at every epoch end from their real length, up to {wanted} "
                   f"({rules.target})")
    return n_epochs, wanted, reasons


def plan_schedule(
    *,
    rules: EpochRules,
    accelerator: str,
    epoch_s: float,
    default_budget_s: float,
    wanted_steps: int,
    train_pixels: int,
    patch: list[int],
    batch: int,
    val_tiles: int,
    step_seconds: float | None,
    eval_seconds: float | None,
    epochs: int | None,
    time_budget: float | None,
    early_stop: str | None = None,
) -> Schedule:
    """Steps per epoch, epoch count and budget from the measured step time (pure).

    Args:
        rules: the task's constants.
        accelerator: the device's name, for the reasons.
        epoch_s: target seconds of one epoch on this device.
        default_budget_s: training seconds when the user gives neither epochs nor a budget.
        wanted_steps: the task's step target: past it quality barely improves, so a fast device stops there.
        train_pixels: pixels (voxels) training draws its patches from.
        patch: patch size; batch: patches per step.
        val_tiles: validation tiles run at every epoch end.
        step_seconds: measured seconds per training step, or None.
        eval_seconds: measured seconds per forward-only batch, or None.
        epochs: user override of the epoch count (run in full).
        time_budget: user cap on training seconds.
        early_stop: the task's early-stop rule in words, or None if it has none; it applies to an
            automatic epoch count only, since a count the user gave is run in full.
    """
    # Snapped (a no-op on a value ``settle_step_seconds`` returned): see the module docstring.
    step_s = settle_step_seconds(step_seconds)
    eval_seconds = settle_step_seconds(eval_seconds)
    cover = math.ceil(rules.cover_passes * train_pixels / (batch * math.prod(patch)))
    steps, why = steps_per_epoch(step_s, epoch_s, cover, rules)
    reasons = [why]
    epoch_seconds = steps * (step_s or 0.0) + math.ceil(val_tiles / batch) * (eval_seconds or 0.0)
    ceiling = None
    if epochs is not None:
        n_epochs, budget = int(epochs), time_budget
        reasons.append(f"epochs {n_epochs}: user override")
    else:
        budget = time_budget if time_budget is not None else default_budget_s
        n_epochs, ceiling, more = epoch_count(steps, epoch_seconds, budget, wanted_steps, rules)
        reasons += more
    stops_early = epochs is None and early_stop is not None
    if stops_early:
        reasons.append(early_stop)
    if budget is not None:
        src = "user cap" if time_budget is not None else f"{accelerator} default"
        reasons.append(f"time budget {budget:.0f} s of training across resumes ({src}); lr anneals by time too")
    return Schedule(steps, n_epochs, budget, ceiling, stops_early, step_s, epoch_seconds, reasons)
