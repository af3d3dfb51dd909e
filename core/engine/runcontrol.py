"""Run control of a training call: training seconds, stop requests, the stop rule, a checkpoint every epoch.

Both tasks train under one ``RunControl``; a task adds its own rules as two callables
(segmentation re-fits its epoch count to the budget and ends at a plateau). What the control
keeps in a checkpoint (``read_run_state``) is what a resumed call continues from.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Protocol

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from dlorch.core.engine.checkpoint import read_checkpoint
from dlorch.core.engine.hooks import Progress, StopReason, TrainHooks, TrainResult
from dlorch.core.engine.module import TrainingModule

# Checkpoints of this call older than the newest few are deleted: each holds optimizer state
# and best weights, and one per epoch would fill a node's disk on long jobs.
KEEP_CHECKPOINTS = 2
# The keys the run-control state is stored under in a checkpoint's "callbacks" section, one per
# task: the names of the classes that once wrote them, kept so stored checkpoints resume.
STATE_KEYS = ("RunControl", "DenoiseRunControl")
# The learning rate anneals by steps, and by time only once the time used runs ahead of the plan:
# the share of the budget counts from this share on (``time_progress``). A run on schedule then
# follows its steps alone, and the same command trains the same weights however the clock jitters.
TIME_SLACK = 0.1


def time_progress(train_seconds: float, budget_s: float | None) -> float:
    """Training progress by the clock, for the learning rate: 0 until TIME_SLACK of the budget, 1 at its end (pure)."""
    if not budget_s:
        return 0.0
    return max(0.0, (train_seconds / budget_s - TIME_SLACK) / (1 - TIME_SLACK))


def write_checkpoint(checkpoint: dict, path: pathlib.Path) -> None:
    """Serialise a checkpoint to ``path`` through a temporary file: a reader only ever sees a complete one."""
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def snapshot(trainer: pl.Trainer, *, copy: bool = True) -> dict:
    """The trainer's checkpoint as of now; with ``copy``, its tensors copied, so training may go on while it is saved.

    What Lightning's ``save_checkpoint`` would write (weights, optimiser moments, the callbacks' and
    the module's sections); the copy costs milliseconds where serialising costs a tenth of a second.
    """
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    return apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone()) if copy else checkpoint


class CheckpointPublisher:
    """Writes checkpoints and hands them to ``hooks.on_checkpoint`` on a background thread, off the training thread.

    The training thread only snapshots the state (``snapshot``); serialising it, the upload and the
    report overlap the next epoch. The queue holds one: a newer checkpoint supersedes one not yet
    written (it holds everything the older one did). ``flush`` waits until the newest is written
    and published, so the final checkpoint always is before a job finishes. A failure (a lost lease,
    a store error, a full disk) stops the publisher and is raised on the training thread at its next
    call (``raise_failure``, ``submit``, ``flush``), as if it had happened there.
    """

    def __init__(self, hooks: TrainHooks) -> None:
        self.hooks = hooks
        self._cond = threading.Condition()
        self._pending: tuple[pathlib.Path, Progress, dict | None] | None = None
        self._sending: pathlib.Path | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.superseded = 0  # checkpoints replaced by a newer one before they were sent

    def submit(self, path: pathlib.Path, progress: Progress, checkpoint: dict | None = None) -> None:
        """Publish ``path`` next (first writing ``checkpoint`` there, if given), replacing a checkpoint still waiting."""
        with self._cond:
            self._raise_failure()
            if self._pending is not None:
                self.superseded += 1
            self._pending = (path, progress, checkpoint)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-publisher", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def in_use(self) -> set[pathlib.Path]:
        """Checkpoint files the publisher is sending or will send (not to be deleted yet)."""
        with self._cond:
            return {p for p in (self._sending, self._pending[0] if self._pending else None) if p is not None}

    def raise_failure(self) -> None:
        """Raise the hook's exception, if publishing failed."""
        with self._cond:
            self._raise_failure()

    def flush(self) -> None:
        """Wait until every submitted checkpoint is published or superseded; raise the hook's failure."""
        with self._cond:
            while self._failure is None and (self._pending is not None or self._sending is not None):
                self._cond.wait()
            self._raise_failure()

    def close(self) -> None:
        """Stop the thread once it is idle (what is still waiting is dropped)."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (path, progress, checkpoint), self._pending = self._pending, None
                self._sending = path
            try:
                if checkpoint is not None:
                    write_checkpoint(checkpoint, path)
                    del checkpoint
                self.hooks.on_checkpoint(path, progress)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
                with self._cond:
                    self._failure, self._sending, self._pending = e, None, None
                    self._cond.notify_all()
                return
            with self._cond:
                self._sending = None
                self._cond.notify_all()


class EpochPlan(Protocol):
    """The part of a plan the run control follows; ``epochs`` may be re-fitted as training runs."""

    epochs: int
    time_budget_s: float | None


def stop_reason(*, epochs_done: int, epochs: int, plateaued: bool, stop_requested: bool,
                budget_spent: bool) -> StopReason | None:
    """Why training ends at this epoch end, or None to go on (pure); the first that holds, in this order."""
    if epochs_done >= epochs:
        return StopReason.EPOCHS
    if plateaued:
        return StopReason.PLATEAU
    if stop_requested:
        return StopReason.STOP_REQUEST
    if budget_spent:
        return StopReason.TIME_BUDGET
    return None


class RunControl(pl.Callback):
    """Counts training seconds, polls for stop requests, writes a checkpoint at every epoch end.

    The clock is passed in (monotonic by default) so tests can drive time.

    Args:
        plan: the epochs to train and the time budget; shared with the module, whose learning
            rate follows ``plan.epochs`` as ``refit_epochs`` changes it.
        workdir: where checkpoints are written.
        hooks: stop polling and checkpoint notices.
        state_key: the key of this state in a checkpoint (one of ``STATE_KEYS``).
        train_seconds: seconds trained by earlier calls (resume).
        clock: seconds, monotonic.
        refit_epochs: (epochs done, training seconds) -> the epoch count, at every epoch end; None keeps the plan's.
        plateaued: (module, epochs done) -> whether training stopped improving; None never stops early.
        count_checkpoint_seconds: whether writing a checkpoint and the hook's notice count as
            training time (segmentation: yes; denoising: no).
    """

    def __init__(
        self,
        plan: EpochPlan,
        workdir: pathlib.Path,
        hooks: TrainHooks,
        *,
        state_key: str,
        train_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        refit_epochs: Callable[[int, float], int] | None = None,
        plateaued: Callable[[TrainingModule, int], bool] | None = None,
        count_checkpoint_seconds: bool = True,
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.hooks = hooks
        self._state_key = state_key
        self.clock = clock
        self.refit_epochs = refit_epochs
        self.plateaued = plateaued
        self.count_checkpoint_seconds = count_checkpoint_seconds
        self.train_seconds = train_seconds
        self.epochs_done = 0
        self.stop_requested = False
        self.stopped_by: StopReason | None = None
        self.last_checkpoint: pathlib.Path | None = None
        self.metrics: dict[str, float] = {}
        self._written: list[pathlib.Path] = []
        # Hooks whose notice is slow (an upload and a report) and safe off the training thread say so.
        self.publisher = CheckpointPublisher(hooks) if getattr(hooks, "background", False) else None
        self._t = clock()

    @property
    def state_key(self) -> str:
        return self._state_key

    def _tick(self) -> None:
        now = self.clock()
        self.train_seconds += now - self._t
        self._t = now

    def budget_spent(self) -> bool:
        budget = self.plan.time_budget_s
        return budget is not None and self.train_seconds >= budget

    def on_train_start(self, trainer: pl.Trainer, pl_module: TrainingModule) -> None:
        self._t = self.clock()

    def on_train_batch_start(self, trainer, pl_module: TrainingModule, batch, batch_idx: int) -> None:
        self._tick()
        budget = self.plan.time_budget_s
        pl_module.time_fraction = time_progress(self.train_seconds, budget)
        if self.budget_spent():
            # The module's own hook then returns -1, which ends this epoch early.
            pl_module.skip_rest_of_epoch = True

    def on_train_batch_end(self, trainer, pl_module: TrainingModule, outputs, batch, batch_idx: int) -> None:
        self._tick()
        if self.publisher is not None:
            self.publisher.raise_failure()
        if self.hooks.should_stop():
            self.stop_requested = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: TrainingModule) -> None:
        self._tick()  # validation ran just before this hook, so its seconds count too
        pl_module.update_best()
        self.epochs_done = trainer.current_epoch + 1
        if self.refit_epochs is not None:
            self.plan.epochs = self.refit_epochs(self.epochs_done, self.train_seconds)
        plateaued = self.plateaued is not None and self.plateaued(pl_module, self.epochs_done)
        self.stopped_by = stop_reason(epochs_done=self.epochs_done, epochs=self.plan.epochs, plateaued=plateaued,
                                      stop_requested=self.stop_requested, budget_spent=self.budget_spent())
        if self.stopped_by is not None:
            trainer.should_stop = True
        self.metrics = dict(pl_module.epoch_metrics, train_seconds=self.train_seconds)
        self._write_checkpoint(trainer)
        if not self.count_checkpoint_seconds:
            self._t = self.clock()

    def _write_checkpoint(self, trainer: pl.Trainer) -> None:
        path = self.workdir / f"epoch-{self.epochs_done:04d}.ckpt"
        self.last_checkpoint = path
        self._written.append(path)
        progress = Progress(self.epochs_done, self.plan.epochs, dict(self.metrics))
        in_use: set[pathlib.Path] = set()
        if self.publisher is None:
            write_checkpoint(snapshot(trainer, copy=False), path)
            self.hooks.on_checkpoint(path, progress)
        else:  # serialised on the publisher's thread: training goes on meanwhile
            self.publisher.submit(path, progress, snapshot(trainer))
            in_use = self.publisher.in_use()
        keep = [p for p in self._written[:-KEEP_CHECKPOINTS] if p in in_use]
        for old in self._written[:-KEEP_CHECKPOINTS]:
            if old not in in_use:
                old.unlink(missing_ok=True)
        self._written = keep + self._written[-KEEP_CHECKPOINTS:]

    def on_exception(self, trainer: pl.Trainer, pl_module: TrainingModule, exception: BaseException) -> None:
        if self.publisher is not None:
            self.publisher.close()

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "epochs_done": self.epochs_done, "metrics": self.metrics,
                "finished": self.stopped_by == StopReason.PLATEAU, "epochs": self.plan.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.metrics = dict(state_dict.get("metrics", {}))

    def result(self) -> TrainResult:
        """The outcome of the call, once Lightning's fit has returned (and its last checkpoint published)."""
        if self.publisher is not None:
            try:
                self.publisher.flush()
            finally:
                self.publisher.close()
        if self.last_checkpoint is None:
            raise RuntimeError("training ended without writing a checkpoint")
        stopped_by = self.stopped_by or StopReason.EPOCHS
        return TrainResult(self.epochs_done, stopped_by.value, self.last_checkpoint, dict(self.metrics),
                           self.plan.epochs)


def read_run_state(checkpoint: pathlib.Path) -> dict:
    """The run-control state (train_seconds, epochs_done, metrics, finished, epochs) stored in a checkpoint."""
    callbacks = read_checkpoint(checkpoint).get("callbacks", {})
    return next((callbacks[key] for key in STATE_KEYS if key in callbacks), {})


def finished_result(state: dict, checkpoint: pathlib.Path, plan: EpochPlan) -> TrainResult | None:
    """The result of a resumed call that has nothing left to train, from its checkpoint's run state; else None.

    Finished: the plan's epochs are done, training had stopped at a plateau, or the time budget is spent.
    """
    done, train_seconds = int(state.get("epochs_done", 0)), float(state.get("train_seconds", 0.0))
    finished = stop_reason(epochs_done=done, epochs=plan.epochs, plateaued=bool(state.get("finished")),
                           stop_requested=False,
                           budget_spent=plan.time_budget_s is not None and train_seconds >= plan.time_budget_s)
    if finished is None:
        return None
    return TrainResult(done, finished.value, pathlib.Path(checkpoint), dict(state.get("metrics", {})), plan.epochs)
