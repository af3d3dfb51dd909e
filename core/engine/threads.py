"""Per-epoch choice of the CPU thread count: all cores, or half of them when the CPU is shared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch

# Probe batches per candidate at the start of every epoch; they are real training batches,
# only their thread count differs, so probing costs nothing but the slower variant's extra time.
PROBE_STEPS = 2


class ThreadTuner(pl.Callback):
    """Times the first batches of each epoch with every candidate thread count, then uses the fastest.

    Contention on a shared machine comes and goes, so the choice is made again every epoch.
    Only used on a CPU with several cores and epochs long enough for the probe to be cheap.
    """

    def __init__(self, candidates: list[int], clock: Callable[[], float] = time.perf_counter) -> None:
        self.candidates = candidates
        self.clock = clock
        self.choice = candidates[0]
        self._queue: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._current = self.choice
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._queue = [c for _ in range(PROBE_STEPS) for c in self.candidates]
        self._times = {c: [] for c in self.candidates}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._current = self._queue[0] if self._queue else self.choice
        if torch.get_num_threads() != self._current:
            torch.set_num_threads(self._current)
        self._t0 = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._queue:
            return
        self._times[self._current].append(self.clock() - self._t0)
        self._queue.pop(0)
        if not self._queue:
            self.choice = min(self.candidates, key=lambda c: statistics.median(self._times[c]))
            metrics = getattr(pl_module, "epoch_metrics", None)
            if metrics is not None:
                metrics["cpu_threads"] = float(self.choice)
