"""Lightning module for denoising: masked MSE, held-out loss, best weights by that loss."""

from __future__ import annotations

import math

import torch

from dlorch.core.engine.denoise.blindspot import masked_mse
from dlorch.core.engine.denoise.plan import DenoisingPlan
from dlorch.core.engine.module import TrainingModule
from dlorch.core.engine.network import build_unet

# Key of the engine's own section in a Lightning checkpoint; prediction needs only this.
CKPT_KEY = "dlorch_denoise"


def build_denoiser(plan: DenoisingPlan) -> torch.nn.Module:
    """The plan's U-Net: one input channel, one output channel (the denoised intensity, normalised)."""
    return build_unet(plan.spatial_dims, 1, 1, plan.filters, plan.norm)


class DenoisingModule(TrainingModule):
    """Trains a DynUNet to denoise and remembers the weights with the lowest held-out loss."""

    ckpt_key = CKPT_KEY

    def __init__(self, plan: DenoisingPlan) -> None:
        super().__init__(plan, build_denoiser(plan))
        self.best_val_loss = math.inf
        self._val_sum = 0.0
        self._val_n = 0.0

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

    def keep_if_best(self, m: dict[str, float]) -> None:
        """Keep the current weights if their held-out loss is the lowest so far.

        Without a validation region the latest weights count as the best.
        """
        val = m.get("val_loss", -math.inf)
        if val <= self.best_val_loss or self.best_state is None:
            self.best_val_loss = val
            self.best_epoch = self.current_epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        if "val_loss" in m:
            m["best_val_loss"] = self.best_val_loss

    def saved_state(self) -> dict:
        return {"best_val_loss": self.best_val_loss}

    def restore_state(self, own: dict) -> None:
        self.best_val_loss = own.get("best_val_loss", math.inf)
