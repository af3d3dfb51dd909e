"""What training exchanges with the job runner: stop polling, checkpoint notices, progress, result."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class StopReason(str, Enum):
    """Why a training call (``train_segmentation``, ``train_denoising``) returned."""

    EPOCHS = "epochs"  # all plan.epochs are done (over all resumes)
    TIME_BUDGET = "time_budget"  # plan.time_budget_s of training seconds are used up
    STOP_REQUEST = "stop_request"  # hooks.should_stop() turned True; resume to continue
    PLATEAU = "plateau"  # segmentation: the held-out strokes stopped improving (plan.stop_at_plateau; plateaued())


@dataclass
class Progress:
    """Where training stands when a checkpoint is written."""

    epochs_done: int
    epochs_total: int
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, val_loss, val_iou, ...


@dataclass
class TrainResult:
    """Outcome of one training call."""

    epochs_done: int
    stopped_by: str  # a StopReason value
    checkpoint: pathlib.Path  # last checkpoint written; it holds the best weights for prediction
    metrics: dict[str, float]
    epochs_total: int = 0  # the epoch count it ran toward (a plan's may be re-fitted); 0: the plan's


class TrainHooks(Protocol):
    """Callbacks from the training loop to the job runner.

    Hooks with a true ``background`` attribute have ``on_checkpoint`` called on a publisher thread
    (runcontrol.CheckpointPublisher): training goes on while it uploads; a newer checkpoint supersedes
    one not yet handed over; the last is always handed over before the training call returns; its
    exceptions are raised on the training thread at the next batch end. Without it, the call is inline.
    """

    def should_stop(self) -> bool:
        """Polled at every batch end; True finishes the current epoch, checkpoints it and returns.

        An exception raised here abandons the call at once, mid-epoch and with no checkpoint written
        (a job runner whose lease is gone: that epoch's work could never be accepted); it propagates.
        """
        ...

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        """Called after every checkpoint file is completely written; exceptions propagate."""
        ...


class NoHooks:
    """Hooks that never stop and ignore checkpoints (benchmarks, tests)."""

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        return None
