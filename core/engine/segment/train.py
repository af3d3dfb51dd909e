"""Training entry point: the Lightning loop with checkpoints, stop requests, time budget and resume."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from dlorch.core.engine.device import apply_threads, detect_runtime, thread_candidates
from dlorch.core.engine.segment.holdout import split_strokes
from dlorch.core.engine.hooks import Progress, StopReason, TrainHooks, TrainResult
from dlorch.core.engine.inputs import check_labels
from dlorch.core.engine.segment.intensity import normalize
from dlorch.core.engine.segment.module import SegmentationModule
from dlorch.core.engine.segment.plan import SegmentationPlan, extended_epochs, plateaued
from dlorch.core.engine.segment.sampling import TrainPatches, ValTiles
from dlorch.core.engine.threads import ThreadTuner

# Checkpoints of this call older than the newest few are deleted: each holds optimizer state
# and best weights, and one per epoch would fill a node's disk on long jobs.
KEEP_CHECKPOINTS = 2
# Epochs shorter than this keep a fixed thread count: probing would be most of the epoch.
THREAD_PROBE_MIN_STEPS = 20


class EpochSeeder(pl.Callback):
    """Tells the patch sampler the epoch before its first batch (its batches are seeded by epoch)."""

    def __init__(self, dataset: TrainPatches) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dataset.epoch = trainer.current_epoch


class RunControl(pl.Callback):
    """Counts training seconds, polls for stop requests, writes a checkpoint at every epoch end.

    The clock is passed in (monotonic by default) so tests can drive time.
    """

    def __init__(
        self,
        plan: SegmentationPlan,
        workdir: pathlib.Path,
        hooks: TrainHooks,
        train_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.hooks = hooks
        self.clock = clock
        self.train_seconds = train_seconds
        self.epochs_done = 0
        self.stop_requested = False
        self.stopped_by: StopReason | None = None
        self.last_checkpoint: pathlib.Path | None = None
        self.metrics: dict[str, float] = {}
        self._written: list[pathlib.Path] = []
        self._t = clock()

    def _tick(self) -> None:
        now = self.clock()
        self.train_seconds += now - self._t
        self._t = now

    def budget_spent(self) -> bool:
        budget = self.plan.time_budget_s
        return budget is not None and self.train_seconds >= budget

    def on_train_start(self, trainer: pl.Trainer, pl_module: SegmentationModule) -> None:
        self._t = self.clock()

    def on_train_batch_start(self, trainer, pl_module: SegmentationModule, batch, batch_idx: int) -> None:
        self._tick()
        budget = self.plan.time_budget_s
        pl_module.time_fraction = self.train_seconds / budget if budget else 0.0
        if self.budget_spent():
            # The module's own hook then returns -1, which ends this epoch early.
            pl_module.skip_rest_of_epoch = True

    def on_train_batch_end(self, trainer, pl_module: SegmentationModule, outputs, batch, batch_idx: int) -> None:
        self._tick()
        if self.hooks.should_stop():
            self.stop_requested = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: SegmentationModule) -> None:
        self._tick()
        pl_module.update_best()
        self.epochs_done = trainer.current_epoch + 1
        # Shared with the module, whose learning rate follows it from the next step on.
        self.plan.epochs = extended_epochs(self.plan.epochs, self.plan.epochs_ceiling, self.epochs_done,
                                           self.train_seconds, self.plan.time_budget_s)
        if self.epochs_done >= self.plan.epochs:
            self.stopped_by = StopReason.EPOCHS
        elif self.plan.stop_at_plateau and plateaued(self.epochs_done, pl_module.best_epoch + 1, pl_module.peak_epochs,
                                                     self.plan.epochs):
            self.stopped_by = StopReason.PLATEAU
        elif self.stop_requested:
            self.stopped_by = StopReason.STOP_REQUEST
        elif self.budget_spent():
            self.stopped_by = StopReason.TIME_BUDGET
        if self.stopped_by is not None:
            trainer.should_stop = True
        self.metrics = dict(pl_module.epoch_metrics, train_seconds=self.train_seconds)
        path = self.workdir / f"epoch-{self.epochs_done:04d}.ckpt"
        tmp = path.with_suffix(".ckpt.tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, path)  # the hook only ever sees a complete file
        self.last_checkpoint = path
        self._written.append(path)
        self.hooks.on_checkpoint(path, Progress(self.epochs_done, self.plan.epochs, dict(self.metrics)))
        for old in self._written[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        self._written = self._written[-KEEP_CHECKPOINTS:]

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "epochs_done": self.epochs_done, "metrics": self.metrics,
                "finished": self.stopped_by == StopReason.PLATEAU, "epochs": self.plan.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.metrics = dict(state_dict.get("metrics", {}))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banner lines and tips for one call; the job log has our own progress."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Batches are cut in-process on purpose (see sampling.py); Lightning's hint to add
            # worker processes would only steal cores from the network on a small CPU.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning vs torch 2.13 internals
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def read_run_state(checkpoint: pathlib.Path) -> dict:
    """The run-control state (train_seconds, epochs_done, metrics) stored in a checkpoint."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ckpt.get("callbacks", {}).get(RunControl.__qualname__, {})


def train_segmentation(
    image: np.ndarray,
    labels: np.ndarray,
    plan: SegmentationPlan,
    *,
    workdir: pathlib.Path,
    resume_from: pathlib.Path | None,
    hooks: TrainHooks,
) -> TrainResult:
    """Train (or resume training) a segmentation model on sparse labels.

    A checkpoint ``epoch-NNNN.ckpt`` is written to ``workdir`` at every epoch end and
    announced through ``hooks.on_checkpoint``; only the newest two written by this call are
    kept. A stop request finishes the current epoch first, so resuming continues at the next
    epoch and the epochs trained over all resumes add up to exactly ``plan.epochs`` (as re-fitted
    to the time budget where the plan allows it: ``extended_epochs``; ``TrainResult.epochs_total``).

    Args:
        image: (Y, X) or (Z, Y, X) image, the one the plan was made for.
        labels: same shape, 0 = unlabelled, 1..K.
        plan: from ``plan_segmentation``.
        workdir: directory for checkpoints (created if missing).
        resume_from: a checkpoint of an earlier call, or None to start fresh.
        hooks: stop polling and checkpoint notices; exceptions they raise propagate.

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
        done, train_seconds = int(state.get("epochs_done", 0)), float(state.get("train_seconds", 0.0))
        if plan.epochs_ceiling is not None:  # the count as re-fitted before this resume
            plan.epochs = min(plan.epochs_ceiling, max(plan.epochs, int(state.get("epochs", plan.epochs))))
        finished = StopReason.EPOCHS if done >= plan.epochs else None
        if finished is None and state.get("finished"):  # it had stopped at a plateau
            finished = StopReason.PLATEAU
        if finished is None and plan.time_budget_s is not None and train_seconds >= plan.time_budget_s:
            finished = StopReason.TIME_BUDGET
        if finished is not None:
            return TrainResult(done, finished.value, pathlib.Path(resume_from), dict(state.get("metrics", {})),
                               plan.epochs)

    runtime = detect_runtime()
    apply_threads(runtime)
    pl.seed_everything(plan.seed, verbose=False)
    norm = normalize(stack)
    split = split_strokes(lab, plan.val_fraction, seed=plan.seed, link_slices=plan.spatial_dims == 3)
    patch = tuple(plan.patch_size)
    train_data = TrainPatches(norm, split.train, patch, plan.batch_size, plan.steps_per_epoch, plan.seed)
    val_data = ValTiles(norm, split.val, patch, plan.batch_size, plan.seed)
    module = SegmentationModule(plan)
    control = RunControl(plan, workdir, hooks, train_seconds=train_seconds)

    callbacks: list[pl.Callback] = [EpochSeeder(train_data), control]
    candidates = thread_candidates(runtime)
    if len(candidates) > 1 and plan.steps_per_epoch >= THREAD_PROBE_MIN_STEPS:
        callbacks.append(ThreadTuner(candidates))
    trainer_args = dict(
        accelerator=runtime.accelerator,
        devices=1,
        precision=runtime.precision,
        max_epochs=max(plan.epochs, plan.epochs_ceiling or 0),  # RunControl ends the run at plan.epochs
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if len(val_data) else 0,
        callbacks=callbacks,
        default_root_dir=str(workdir),
    )
    loaders = {"train_dataloaders": DataLoader(train_data, batch_size=None, shuffle=False, num_workers=0)}
    if len(val_data):
        loaders["val_dataloaders"] = DataLoader(val_data, batch_size=None, shuffle=False, num_workers=0)
    with quiet_lightning():
        trainer = pl.Trainer(**trainer_args)
        ckpt_path = str(resume_from) if resume_from is not None else None
        # weights_only: a resume checkpoint comes from the store; never unpickle code from it.
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True, **loaders)

    if control.last_checkpoint is None:
        raise RuntimeError("training ended without writing a checkpoint")
    stopped_by = control.stopped_by or StopReason.EPOCHS
    return TrainResult(control.epochs_done, stopped_by.value, control.last_checkpoint, dict(control.metrics),
                       plan.epochs)
