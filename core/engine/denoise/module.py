"""Lightning module for denoising: masked MSE, lr schedule by steps and time, best weights by validation."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from dlorch.core.engine.denoise.blindspot import masked_mse
from dlorch.core.engine.denoise.plan import DenoisingPlan
from dlorch.core.engine.network import build_unet, memory_format

# Key of the engine's own section in a Lightning checkpoint; prediction needs only this.
CKPT_KEY = "dlorch_denoise"


def lr_factor(progress: float, warmup: float, final: float) -> float:
    """Multiplier of the peak lr at a training progress in [0, 1]: linear warm-up, cosine decay to ``final``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def build_denoiser(plan: DenoisingPlan) -> torch.nn.Module:
    """The plan's U-Net: one input channel, one output channel (the denoised intensity, normalised)."""
    return build_unet(plan.spatial_dims, 1, 1, plan.filters, plan.norm)


class DenoisingModule(pl.LightningModule):
    """Trains a DynUNet to denoise and remembers the weights with the lowest held-out loss."""

    def __init__(self, plan: DenoisingPlan) -> None:
        super().__init__()
        self.plan = plan
        self.net = build_denoiser(plan).to(memory_format=memory_format(plan.spatial_dims + 2))
        # Set by the run-control callback: share of the time budget used, and whether the
        # budget ran out so the rest of the epoch is skipped.
        self.time_fraction = 0.0
        self.skip_rest_of_epoch = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val_loss = math.inf
        self.best_epoch = -1
        self.epoch_metrics: dict[str, float] = {}
        self._train_sum = 0.0
        self._train_n = 0
        self._val_sum = 0.0
        self._val_n = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=memory_format(x.dim())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.plan.lr, weight_decay=self.plan.weight_decay)

    # The schedule is a function of (step, time used), not a stateful scheduler: it resumes
    # exactly from any checkpoint, and still anneals when the time budget, not the step
    # count, ends the training on a slow or shared machine.
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

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, weight = batch
        loss = masked_mse(self(x), y, weight)
        self._train_sum += float(loss.detach())
        self._train_n += 1
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_n = 0.0, 0.0

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, weight = batch
        n = float(weight.sum())
        self._val_sum += float(masked_mse(self(x), y, weight)) * n
        self._val_n += n

    def on_validation_epoch_end(self) -> None:
        if self._val_n > 0 and not self.trainer.sanity_checking:
            self.epoch_metrics["val_loss"] = self._val_sum / self._val_n

    def update_best(self) -> None:
        """Keep the current weights if their held-out loss is the lowest so far.

        Without a validation region the latest weights count as the best.
        """
        m = self.epoch_metrics
        m["train_loss"] = self._train_sum / max(1, self._train_n)
        val = m.get("val_loss", -math.inf)
        if val <= self.best_val_loss or self.best_state is None:
            self.best_val_loss = val
            self.best_epoch = self.current_epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        if "val_loss" in m:
            m["best_val_loss"] = self.best_val_loss
        m["best_epoch"] = float(self.best_epoch + 1)
        m["lr"] = self.current_lr()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {
            "plan": self.plan.model_dump(mode="json"),
            "best_state": self.best_state,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = checkpoint.get(CKPT_KEY, {})
        self.best_state = own.get("best_state")
        self.best_val_loss = own.get("best_val_loss", math.inf)
        self.best_epoch = own.get("best_epoch", -1)
