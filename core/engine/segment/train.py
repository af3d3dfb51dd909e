"""Segmentation training: the shared Lightning run with segmentation's data, module and stop rules."""

from __future__ import annotations

import pathlib

import numpy as np

from dlorch.core.engine.device import thread_candidates
from dlorch.core.engine.hooks import TrainHooks, TrainResult
from dlorch.core.engine.inputs import check_accepted, check_labels
from dlorch.core.engine.runcontrol import RunControl, finished_result, read_run_state
from dlorch.core.engine.segment.accepted import DEFAULT_ACCEPTED_WEIGHT, encode_accepted
from dlorch.core.engine.segment.holdout import split_strokes
from dlorch.core.engine.segment.intensity import normalize
from dlorch.core.engine.segment.module import SegmentationModule
from dlorch.core.engine.segment.plan import SegmentationPlan, extended_epochs, plateaued
from dlorch.core.engine.segment.sampling import TrainPatches, ValTiles
from dlorch.core.engine.segment.warmstart import initial_weights, source_prior
from dlorch.core.engine.threads import ThreadTuner
from dlorch.core.engine.trainer import fit, start_run

# Epochs shorter than this keep a fixed thread count: probing would be most of the epoch.
THREAD_PROBE_MIN_STEPS = 20
# Where this task's run-control state lies in a checkpoint (runcontrol.STATE_KEYS).
RUN_STATE_KEY = "RunControl"


def run_control(plan: SegmentationPlan, workdir: pathlib.Path, hooks: TrainHooks, train_seconds: float) -> RunControl:
    """The run control with segmentation's rules: the epochs re-fitted to the budget, an early stop at a plateau."""

    def refit(epochs_done: int, seconds: float) -> int:
        return extended_epochs(plan.epochs, plan.epochs_ceiling, epochs_done, seconds, plan.time_budget_s)

    def at_plateau(module: SegmentationModule, epochs_done: int) -> bool:
        return plan.stop_at_plateau and plateaued(epochs_done, module.best_epoch + 1, module.peak_epochs, plan.epochs)

    return RunControl(plan, workdir, hooks, state_key=RUN_STATE_KEY, train_seconds=train_seconds,
                      refit_epochs=refit, plateaued=at_plateau)


def train_segmentation(
    image: np.ndarray,
    labels: np.ndarray,
    plan: SegmentationPlan,
    *,
    workdir: pathlib.Path,
    resume_from: pathlib.Path | None,
    hooks: TrainHooks,
    accepted: np.ndarray | None = None,
    init_from: pathlib.Path | None = None,
) -> TrainResult:
    """Train (or resume training) a segmentation model on sparse labels.

    The run is the shared one (``trainer.fit`` under ``runcontrol.RunControl``): a checkpoint
    ``epoch-NNNN.ckpt`` in ``workdir`` at every epoch end, announced through ``hooks.on_checkpoint``,
    the newest two of this call kept. A stop request finishes the current epoch first, so resuming
    continues at the next epoch and the epochs over all resumes add up to exactly ``plan.epochs``,
    as re-fitted to the time budget where the plan allows it (``extended_epochs``;
    ``TrainResult.epochs_total``). Where the plan says so, training ends early at a plateau.

    Args:
        image: (Y, X) or (Z, Y, X) image, the one the plan was made for.
        labels: same shape, 0 = unlabelled, 1..K.
        plan: from ``plan_segmentation``; the caller's is left as it is (a copy is re-fitted).
        workdir: directory for checkpoints (created if missing).
        resume_from: a checkpoint of an earlier call, or None to start fresh.
        hooks: stop polling and checkpoint notices; exceptions they raise propagate.
        accepted: labels accepted from a prediction (same shape, 0 = none, 1..K), weighed
            ``plan.accepted_weight`` (default 0.5) of a painted pixel; painted labels win where both
            label a pixel, and only painted strokes are held back for validation (accepted.py).
        init_from: a segmentation checkpoint whose weights training starts from (warmstart.py;
            the plan should be ``warm_plan``'s). Ignored when resuming: a resume continues its own run.

    Returns:
        Epochs done in total, why it stopped, the last checkpoint and its metrics.

    Raises:
        ValueError: bad inputs, or labels whose class count differs from the plan.
    """
    stack, lab, k = check_labels(image, labels)
    if k != plan.num_classes:
        raise ValueError(f"labels have {k} classes but the plan has {plan.num_classes}; re-plan with these labels")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    train_seconds = 0.0
    plan = plan.model_copy(deep=True)  # its epoch count may be re-fitted (extended_epochs); the caller's stays
    if resume_from is not None:
        state = read_run_state(pathlib.Path(resume_from))
        if plan.epochs_ceiling is not None:  # the count as re-fitted before this resume
            plan.epochs = min(plan.epochs_ceiling, max(plan.epochs, int(state.get("epochs", plan.epochs))))
        finished = finished_result(state, resume_from, plan)
        if finished is not None:
            return finished
        train_seconds = float(state.get("train_seconds", 0.0))

    runtime = start_run(plan.seed)
    norm = normalize(stack)
    split = split_strokes(lab, plan.val_fraction, seed=plan.seed, link_slices=plan.spatial_dims == 3)
    patch = tuple(plan.patch_size)
    train_labels = split.train
    if accepted is not None:
        if plan.accepted_weight is None:
            plan.accepted_weight = DEFAULT_ACCEPTED_WEIGHT
        train_labels = encode_accepted(split.train, check_accepted(labels, accepted, k), lab, k)
    elif plan.accepted_weight is not None:
        raise ValueError("the plan weighs accepted labels but none were given; pass accepted=, or plan without them")
    train_data = TrainPatches(norm, train_labels, patch, plan.batch_size, plan.steps_per_epoch, plan.seed,
                              num_classes=k)
    val_data = ValTiles(norm, split.val, patch, plan.batch_size, plan.seed)
    candidates = thread_candidates(runtime)
    tuner = [ThreadTuner(candidates)] if len(candidates) > 1 and plan.steps_per_epoch >= THREAD_PROBE_MIN_STEPS else []
    module = SegmentationModule(plan)
    module.val_tiles = val_data if len(val_data) else None
    if init_from is not None and resume_from is None:
        module.net.load_state_dict(initial_weights(pathlib.Path(init_from), plan))
        if len(val_data):  # the starting weights are scored first: a worse fine-tuning is not kept
            module.start_tiles, module.start_prior = val_data, source_prior(pathlib.Path(init_from))
    return fit(module, run_control(plan, workdir, hooks, train_seconds), train_data, val_data,
               runtime=runtime, workdir=workdir, resume_from=resume_from, callbacks=tuner,
               max_epochs=max(plan.epochs, plan.epochs_ceiling or 0))  # the run control ends it at plan.epochs
