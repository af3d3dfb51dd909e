"""Per-epoch choice of the CPU thread count: all cores, or half of them when the CPU is shared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch

# Probe batches per candidate; they are real training batches, only their thread count differs,
# so probing costs nothing but the slower variant's extra time (~3 % of a 60-step epoch).
PROBE_STEPS = 2
# The first batches of an epoch are not timed: the first of a run carries the warm-up (allocations,
# kernel selection), and every epoch's first ones share the cores with the previous epoch's checkpoint
# being written in the background. Timed, they made two threads look slower than one (ISBI, 2-core
# Xeon VM: one thread chosen for the first 8 epochs of a run, at 1.5x their time).
SKIP_STEPS = 3
# Another count replaces the chosen one only when its probe steps take at most this share of the
# chosen count's: two probe steps each are noisy, and a wrong choice lasts PROBE_EVERY epochs.
SWITCH_SHARE = 0.9
# The candidates are all probed in the first epoch and then every PROBE_EVERY epochs; in between
# only the chosen count's first steps are timed ...
PROBE_EVERY = 8
# ... and all candidates are probed again at once when those steps run this much slower than at
# the last probe: another process has come onto the cores.
REPROBE_SLOWDOWN = 1.25


class ThreadTuner(pl.Callback):
    """Times early batches of an epoch (after ``SKIP_STEPS``) with every candidate thread count, then uses the fastest.

    Contention on a shared machine comes and goes: the choice is made again every ``PROBE_EVERY``
    epochs, and at once when the chosen count's steps slow down by ``REPROBE_SLOWDOWN``. Only used
    on a CPU with several cores and epochs long enough for the probe to be cheap.
    """

    def __init__(self, candidates: list[int], clock: Callable[[], float] = time.perf_counter) -> None:
        self.candidates = candidates
        self.clock = clock
        self.choice = candidates[0]
        self.probes = 0  # full probes made so far
        self._queue: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._full = False  # the batches queued probe every candidate (else they watch the choice)
        self._reference: float | None = None  # the choice's step time at the last full probe
        self._since_probe = PROBE_EVERY
        self._current = self.choice
        self._timing = False  # the batch running is timed
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._full = self._reference is None or self._since_probe >= PROBE_EVERY
        self._queue = self._probe_queue() if self._full else [self.choice] * PROBE_STEPS
        self._times = {c: [] for c in self.candidates}
        self._since_probe += 1

    def _probe_queue(self) -> list[int]:
        return [c for _ in range(PROBE_STEPS) for c in self.candidates]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._timing = bool(self._queue) and batch_idx >= SKIP_STEPS
        self._current = self._queue[0] if self._timing else self.choice
        if torch.get_num_threads() != self._current:
            torch.set_num_threads(self._current)
        self._t0 = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._timing:
            return
        self._times[self._current].append(self.clock() - self._t0)
        self._queue.pop(0)
        if self._queue:
            return
        if not self._full:
            watched = statistics.median(self._times[self.choice])
            if self._reference is not None and watched <= REPROBE_SLOWDOWN * self._reference:
                self._report(pl_module)
                return
            # slower than at the last probe: probe every candidate now, with these steps counted
            self._full = True
            self._queue = [c for c in self._probe_queue() if c != self.choice]
            if self._queue:
                return
        median = {c: statistics.median(t) for c, t in self._times.items() if t}
        fastest = min(median, key=median.__getitem__)
        if self.choice not in median or median[fastest] <= SWITCH_SHARE * median[self.choice]:
            self.choice = fastest
        self._reference = median[self.choice]
        self._since_probe = 1  # this epoch, the probe's own, counts
        self.probes += 1
        self._report(pl_module)

    def _report(self, pl_module) -> None:
        metrics = getattr(pl_module, "epoch_metrics", None)
        if metrics is not None:
            metrics["cpu_threads"] = float(self.choice)
