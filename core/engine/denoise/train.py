"""Denoising training: the shared Lightning run with denoising's data and module."""

from __future__ import annotations

import pathlib

import numpy as np

from dlorch.core.engine.denoise.data import TrainBatches, ValTiles, split_holdout
from dlorch.core.engine.denoise.intensity import normalised_pair
from dlorch.core.engine.denoise.module import DenoisingModule
from dlorch.core.engine.denoise.plan import DenoisingPlan
from dlorch.core.engine.hooks import TrainHooks, TrainResult
from dlorch.core.engine.runcontrol import RunControl, finished_result, read_run_state
from dlorch.core.engine.trainer import fit, start_run

# Where this task's run-control state lies in a checkpoint (runcontrol.STATE_KEYS).
RUN_STATE_KEY = "DenoiseRunControl"


def train_denoising(
    image: np.ndarray,
    target: np.ndarray | None,
    plan: DenoisingPlan,
    *,
    workdir: pathlib.Path,
    resume_from: pathlib.Path | None,
    hooks: TrainHooks,
) -> TrainResult:
    """Train (or resume training) a denoiser.

    The run is the shared one (``trainer.fit`` under ``runcontrol.RunControl``), as for
    segmentation: a checkpoint at every epoch end, stop requests honoured when the epoch ends,
    resume, the time budget; the epochs over all resumes add up to exactly ``plan.epochs``.

    Args:
        image: (Y, X) or (Z, Y, X) noisy image, the one the plan was made for.
        target: None for Noise2Void; else the second noisy acquisition (n2n) or clean image (care).
        plan: from ``plan_denoising``.
        workdir, resume_from, hooks: where the checkpoints go (created if missing), the checkpoint
            of an earlier call to continue (None: start fresh), stop polling and checkpoint notices.

    Returns:
        The ``TrainResult``: epochs done over all resumes, why it stopped, the last checkpoint, its metrics.

    Raises:
        ValueError: bad inputs, or inputs that do not fit the plan.
    """
    inp, tgt = normalised_pair(image, target, plan)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    train_seconds = 0.0
    if resume_from is not None:
        state = read_run_state(pathlib.Path(resume_from))
        finished = finished_result(state, resume_from, plan)
        if finished is not None:
            return finished
        train_seconds = float(state.get("train_seconds", 0.0))

    runtime = start_run(plan.seed)
    train_in, val_in = split_holdout(inp, plan.val_slices, plan.val_rows)
    train_tgt, val_tgt = split_holdout(tgt, plan.val_slices, plan.val_rows) if tgt is not None else (None, None)
    n2v = (plan.blindspot_cell, plan.blindspot_radius) if plan.mode == "n2v" else None
    patch = tuple(plan.patch_size)
    train_data = TrainBatches(
        train_in, train_tgt, patch, plan.batch_size, plan.steps_per_epoch, plan.seed, n2v=n2v, swap=plan.mode == "n2n"
    )
    val_data = ValTiles(val_in, val_tgt, patch, plan.batch_size, plan.seed, n2v=n2v)
    module = DenoisingModule(plan)
    # Writing a checkpoint and the hook's notice (an upload, on a node) are not training time here.
    control = RunControl(plan, workdir, hooks, state_key=RUN_STATE_KEY, train_seconds=train_seconds,
                         count_checkpoint_seconds=False)
    return fit(module, control, train_data, val_data, runtime=runtime, workdir=workdir, resume_from=resume_from,
               max_epochs=plan.epochs)
