"""What both tasks' Lightning modules share: AdamW, the lr by steps and by time, best weights in checkpoints.

The run control (``runcontrol.RunControl``) sets ``time_fraction`` and ``skip_rest_of_epoch`` and
calls ``update_best`` at every epoch end; a task's module adds its loss, its validation and the
rule for the weights it keeps (``keep_if_best``).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from dlorch.core.engine.network import memory_format


def lr_factor(progress: float, warmup: float, final: float) -> float:
    """Multiplier of the peak lr at a training progress in [0, 1]: linear warm-up, cosine decay.

    Args:
        progress: share of training done.
        warmup: share spent warming up.
        final: multiplier reached at progress 1.

    Returns:
        The multiplier.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


class TrainingModule(pl.LightningModule):
    """A plan's network with AdamW and a learning rate by max(step share, time share) of the plan.

    ``plan`` needs ``spatial_dims``, ``lr``, ``weight_decay``, ``warmup_fraction``,
    ``final_lr_fraction``, ``epochs`` and ``steps_per_epoch``.
    """

    def __init__(self, plan, net: torch.nn.Module) -> None:
        super().__init__()
        self.plan = plan
        self.net = net.to(memory_format=memory_format(plan.spatial_dims + 2))
        # Set by the run-control callback: share of the time budget used, and whether the
        # budget ran out so the rest of the epoch is skipped.
        self.time_fraction = 0.0
        self.skip_rest_of_epoch = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = -1
        self.epoch_metrics: dict[str, float] = {}
        self._train_sum = 0.0
        self._train_n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=memory_format(x.dim())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.plan.lr, weight_decay=self.plan.weight_decay)

    # The schedule is a function of (step, time used), not a stateful scheduler: it resumes
    # exactly from any checkpoint, and it still anneals when a slow or shared machine makes
    # the time budget, not the step count, end the training.
    def current_lr(self) -> float:
        total = max(1, self.plan.epochs * self.plan.steps_per_epoch)
        progress = max(self.global_step / total, self.time_fraction)
        return self.plan.lr * lr_factor(progress, self.plan.warmup_fraction, self.plan.final_lr_fraction)

    def on_train_epoch_start(self) -> None:
        self._train_sum, self._train_n = 0.0, 0
        self.skip_rest_of_epoch = False

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        if self.skip_rest_of_epoch:
            return -1
        lr = self.current_lr()
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr
        return None

    # The task's section in a checkpoint: the plan, the best weights and what ``saved_state`` adds.
    ckpt_key: str

    def update_best(self) -> None:
        """At every epoch end: the epoch's metrics; the weights kept if the task's rule says so (``keep_if_best``)."""
        m = self.epoch_metrics
        m["train_loss"] = float(self._train_sum) / max(1, self._train_n)
        self.keep_if_best(m)
        m["best_epoch"] = float(self.best_epoch + 1)
        m["lr"] = self.current_lr()

    def keep_if_best(self, metrics: dict[str, float]) -> None:
        """Set ``best_state`` and ``best_epoch`` to the current weights if they are the task's best; add metrics."""
        raise NotImplementedError

    def saved_state(self) -> dict:
        """What the task keeps in its checkpoint section besides the plan and the best weights."""
        return {}

    def restore_state(self, own: dict) -> None:
        """Read back what ``saved_state`` kept."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.ckpt_key] = {"plan": self.plan.model_dump(mode="json"), "best_state": self.best_state,
                                     "best_epoch": self.best_epoch, **self.saved_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = checkpoint.get(self.ckpt_key, {})
        self.best_state = own.get("best_state")
        self.best_epoch = own.get("best_epoch", -1)
        self.restore_state(own)
