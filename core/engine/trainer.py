"""The Lightning run both tasks train in: the trainer's settings, quiet logs, epoch-seeded batches, resume."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings
from collections.abc import Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dlorch.core.engine.device import Runtime, apply_threads, detect_runtime
from dlorch.core.engine.hooks import TrainResult
from dlorch.core.engine.module import TrainingModule
from dlorch.core.engine.runcontrol import RunControl


class EpochSeeder(pl.Callback):
    """Tells the batch sampler the epoch before its first batch (its batches are seeded by epoch)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dataset.epoch = trainer.current_epoch


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's banner lines and tips for one call; the job log has our own progress."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Batches are cut in-process on purpose (segment/sampling.py, denoise/data.py); Lightning's
            # hint to add worker processes would only steal cores from the network on a small CPU.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning vs torch 2.13 internals
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def start_run(seed: int) -> Runtime:
    """The device to train on, its threads applied and every generator seeded with ``seed``.

    On a CPU, torch's deterministic algorithms are asked for too (a warning, not an error, where
    an operation has none): the same inputs then train the same weights. Their side effect of
    filling every new tensor with NaN first is turned off: no dlorch operation reads memory it did
    not write, and the fill cost 5 % of an epoch (ISBI, 2 cores).
    """
    runtime = detect_runtime()
    apply_threads(runtime)
    if runtime.accelerator == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    pl.seed_everything(seed, verbose=False)
    return runtime


def fit(
    module: TrainingModule,
    control: RunControl,
    train_data: Dataset,
    val_data: Dataset,
    *,
    runtime: Runtime,
    workdir: pathlib.Path,
    resume_from: pathlib.Path | None,
    max_epochs: int,
    callbacks: Sequence[pl.Callback] = (),
) -> TrainResult:
    """Train ``module`` until ``control`` ends the run (or ``max_epochs``), resuming from a checkpoint.

    Args:
        module: the task's Lightning module.
        control: the run control, which writes the checkpoints and decides when to stop.
        train_data: batches of an epoch (an ``epoch`` attribute seeds them); val_data: fixed
            validation batches, possibly none.
        runtime: the device.
        workdir: Lightning's root directory (the checkpoints' too).
        resume_from: a checkpoint of an earlier call, or None.
        max_epochs: Lightning's epoch limit; ``control`` normally ends the run first.
        callbacks: more callbacks after the epoch seeder and the run control.

    Returns:
        The run control's result.
    """
    trainer = dict(
        accelerator=runtime.accelerator,
        devices=1,
        precision=runtime.precision,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if len(val_data) else 0,
        callbacks=[EpochSeeder(train_data), control, *callbacks],
        default_root_dir=str(workdir),
    )
    loaders = {"train_dataloaders": DataLoader(train_data, batch_size=None, shuffle=False, num_workers=0)}
    if len(val_data):
        loaders["val_dataloaders"] = DataLoader(val_data, batch_size=None, shuffle=False, num_workers=0)
    with quiet_lightning():
        ckpt_path = str(resume_from) if resume_from is not None else None
        # weights_only: a resume checkpoint comes from the store; never unpickle code from it.
        pl.Trainer(**trainer).fit(module, ckpt_path=ckpt_path, weights_only=True, **loaders)
    return control.result()
