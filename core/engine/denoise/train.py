"""Denoising training entry point: the Lightning loop with checkpoints, stop requests, time budget and resume."""

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

from dlorch.core.engine.denoise.data import TrainBatches, ValTiles, split_holdout
from dlorch.core.engine.inputs import check_denoising_inputs
from dlorch.core.engine.denoise.module import DenoisingModule
from dlorch.core.engine.denoise.plan import DenoisingPlan
from dlorch.core.engine.device import apply_threads, detect_runtime
from dlorch.core.engine.hooks import Progress, StopReason, TrainHooks, TrainResult

# Checkpoints of this call older than the newest few are deleted: each holds optimizer state
# and best weights, and one per epoch would fill a node's disk on long jobs.
KEEP_CHECKPOINTS = 2


class EpochSeeder(pl.Callback):
    """Tells the batch sampler the epoch before its first batch (its batches are seeded by epoch)."""

    def __init__(self, dataset: TrainBatches) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dataset.epoch = trainer.current_epoch


class DenoiseRunControl(pl.Callback):
    """Counts training seconds, polls for stop requests, writes a checkpoint at every epoch end.

    The clock is passed in (monotonic by default) so tests can drive time.
    """

    def __init__(
        self,
        plan: DenoisingPlan,
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: DenoisingModule) -> None:
        self._t = self.clock()

    def on_train_batch_start(self, trainer, pl_module: DenoisingModule, batch, batch_idx: int) -> None:
        self._tick()
        budget = self.plan.time_budget_s
        pl_module.time_fraction = self.train_seconds / budget if budget else 0.0
        if self.budget_spent():
            # The module's own hook then returns -1, which ends this epoch early.
            pl_module.skip_rest_of_epoch = True

    def on_train_batch_end(self, trainer, pl_module: DenoisingModule, outputs, batch, batch_idx: int) -> None:
        self._tick()
        if self.hooks.should_stop():
            self.stop_requested = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: DenoisingModule) -> None:
        self._tick()  # validation ran just before this hook, so its seconds count too
        pl_module.update_best()
        self.epochs_done = trainer.current_epoch + 1
        if self.epochs_done >= self.plan.epochs:
            self.stopped_by = StopReason.EPOCHS
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
        self._t = self.clock()  # checkpoint writing and the hook are not training time

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "epochs_done": self.epochs_done, "metrics": self.metrics}

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
            # Batches are cut in-process on purpose (see denoise_data.py).
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning vs torch 2.13 internals
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def read_run_state(checkpoint: pathlib.Path) -> dict:
    """The run-control state (train_seconds, epochs_done, metrics) stored in a checkpoint."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return ckpt.get("callbacks", {}).get(DenoiseRunControl.__qualname__, {})


def normalised_pair(
    image: np.ndarray, target: np.ndarray | None, plan: DenoisingPlan
) -> tuple[np.ndarray, np.ndarray | None]:
    """The (Z, Y, X) input and target stacks, float32, normalised with the plan's statistics.

    Raises:
        ValueError: the inputs are invalid, do not fit the plan's mode, or differ in shape from the
            image the plan was made for.
    """
    stack, target_stack, _ = check_denoising_inputs(image, target, plan.mode)
    if list(stack.shape) != plan.image_shape:
        raise ValueError(
            f"image shape {tuple(stack.shape)} differs from the plan's {tuple(plan.image_shape)}; "
            "re-plan with plan_denoising on this image"
        )
    inp = (stack.astype(np.float32) - np.float32(plan.input_mean)) / np.float32(plan.input_std)
    if target_stack is None:
        return inp, None
    tgt = (target_stack.astype(np.float32) - np.float32(plan.target_mean)) / np.float32(plan.target_std)
    return inp, tgt


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

    A checkpoint ``epoch-NNNN.ckpt`` is written to ``workdir`` at every epoch end and announced
    through ``hooks.on_checkpoint``; only the newest two written by this call are kept. A stop
    request finishes the current epoch first, so resuming continues at the next epoch and the
    epochs trained over all resumes add up to exactly ``plan.epochs``.

    Args:
        image: (Y, X) or (Z, Y, X) noisy image, the one the plan was made for.
        target: None for Noise2Void; else the second noisy acquisition (n2n) or clean image (care).
        plan: from ``plan_denoising``.
        workdir: directory for checkpoints (created if missing).
        resume_from: a checkpoint of an earlier call, or None to start fresh.
        hooks: stop polling and checkpoint notices; exceptions they raise propagate.

    Returns:
        Epochs done in total, why it stopped, the last checkpoint and its metrics.

    Raises:
        ValueError: bad inputs, or inputs that do not fit the plan.
    """
    inp, tgt = normalised_pair(image, target, plan)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    train_seconds = 0.0
    if resume_from is not None:
        state = read_run_state(pathlib.Path(resume_from))
        done, train_seconds = int(state.get("epochs_done", 0)), float(state.get("train_seconds", 0.0))
        finished = StopReason.EPOCHS if done >= plan.epochs else None
        if finished is None and plan.time_budget_s is not None and train_seconds >= plan.time_budget_s:
            finished = StopReason.TIME_BUDGET
        if finished is not None:
            return TrainResult(done, finished.value, pathlib.Path(resume_from), dict(state.get("metrics", {})))

    runtime = detect_runtime()
    apply_threads(runtime)
    pl.seed_everything(plan.seed, verbose=False)
    train_in, val_in = split_holdout(inp, plan.val_slices, plan.val_rows)
    train_tgt, val_tgt = split_holdout(tgt, plan.val_slices, plan.val_rows) if tgt is not None else (None, None)
    n2v = (plan.blindspot_cell, plan.blindspot_radius) if plan.mode == "n2v" else None
    patch = tuple(plan.patch_size)
    train_data = TrainBatches(
        train_in, train_tgt, patch, plan.batch_size, plan.steps_per_epoch, plan.seed, n2v=n2v, swap=plan.mode == "n2n"
    )
    val_data = ValTiles(val_in, val_tgt, patch, plan.batch_size, plan.seed, n2v=n2v)
    module = DenoisingModule(plan)
    control = DenoiseRunControl(plan, workdir, hooks, train_seconds=train_seconds)

    trainer_args = dict(
        accelerator=runtime.accelerator,
        devices=1,
        precision=runtime.precision,
        max_epochs=plan.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if len(val_data) else 0,
        callbacks=[EpochSeeder(train_data), control],
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
    return TrainResult(control.epochs_done, stopped_by.value, control.last_checkpoint, dict(control.metrics))
