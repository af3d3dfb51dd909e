"""Lightning module for sparse-label segmentation: loss, augmentation, weight averaging, held-out IoU, best weights."""

from __future__ import annotations

import math

import torch

from dlorch.core.engine.module import TrainingModule
from dlorch.core.engine.network import build_unet
from dlorch.core.engine.segment.accepted import decode_accepted
from dlorch.core.engine.segment.augment import augment_batch
from dlorch.core.engine.segment.losses import sparse_ce_dice_loss
from dlorch.core.engine.segment.plan import PLATEAU_MIN_GAIN, SegmentationPlan

# Key of the engine's own section in a Lightning checkpoint; prediction needs only this.
CKPT_KEY = "dlorch"


def build_segmenter(plan: SegmentationPlan) -> torch.nn.Module:
    """The plan's U-Net: one input channel, one output channel (a logit) per class."""
    return build_unet(plan.spatial_dims, 1, plan.num_classes, plan.filters, plan.norm, plan.input_scale)


def blend_into(target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], share: float) -> None:
    """Move ``target``'s floating tensors ``share`` of the way to ``weights``' (in place); counters take the newest.

    The weight averages' one update: the EMA's (share 1 - decay) and the kept mean's (share 1 / members).
    """
    for k, v in weights.items():
        if v.is_floating_point():
            target[k].lerp_(v.detach(), share)
        else:
            target[k].copy_(v)


class SegmentationModule(TrainingModule):
    """Trains a DynUNet on painted pixels and remembers the weights that scored best on held-out strokes."""

    ckpt_key = CKPT_KEY

    def __init__(self, plan: SegmentationPlan) -> None:
        super().__init__(plan, build_segmenter(plan))
        self.best_score = -math.inf
        self.best_val_iou = -1.0
        # The highest held-out IoU so far and the epochs trained when it was reached: what the
        # early stop at a plateau measures (the kept weights follow keep_if_best's tolerance).
        self.peak_val_iou = -1.0
        self.peak_epochs = 0
        self._val: list[torch.Tensor] = []
        # Exponential moving average of the weights (and BN statistics). At a high learning
        # rate the raw weights swing from epoch to epoch; their average is steadier and is
        # what gets validated, kept as best and used for prediction.
        self.ema: dict[str, torch.Tensor] | None = None
        # Painted pixels per class seen by the loss: the class priors the network learned under,
        # undone at prediction by priors.py.
        self.label_counts = torch.zeros(plan.num_classes, dtype=torch.float64)
        self._live: dict[str, torch.Tensor] | None = None
        # A warm start's validation tiles, scored on its starting weights before the first step
        # (``validate_start``); None: nothing to score first.
        self.start_tiles = None
        self.start_val_iou: float | None = None
        # The validation tiles, for an epoch the time budget cut short (Lightning validates only a whole one).
        self.val_tiles = None
        self._validated_epoch = -1
        self.start_prior: list[float] | None = None  # the class shares the starting weights were trained under
        # How many epochs' weights ``best_state`` is the mean of, and the lowest score among them (keep_if_best).
        self.kept_epochs = 0
        self.kept_floor = math.inf

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is None or not self.trainer.training:
            return batch
        x, y = batch
        gen = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + self.global_step)
        return augment_batch(x, y, self.plan.augment, gen)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        weights = None
        if self.plan.accepted_weight is not None:  # accepted labels arrive encoded as class + K (accepted.py)
            y, weights = decode_accepted(y, self.plan.num_classes, self.plan.accepted_weight)
        loss = sparse_ce_dice_loss(self(x), y, dice_weight=self.plan.dice_weight, weights=weights)
        # The class shares the loss saw, each pixel by its weight: the priors prediction corrects for.
        counts = torch.bincount(y.reshape(-1).long(), weights=None if weights is None else weights.reshape(-1),
                                minlength=self.plan.num_classes + 1)[1:]
        self.label_counts = self.label_counts.to(counts.device) + counts.detach().to(torch.float64)
        # Kept as tensors on the device: a float() per step would stall a GPU on every batch.
        self._train_sum = self._train_sum + loss.detach()
        self._train_n += 1
        return loss

    def on_train_start(self) -> None:
        if self.ema is not None:  # restored from a checkpoint on the CPU
            self.ema = {k: v.to(self.device) for k, v in self.ema.items()}
        if self.start_tiles is not None and self.best_state is None:
            self.validate_start()

    @torch.no_grad()
    def _score_tiles(self, tiles) -> dict[str, float] | None:
        """Validation outside Lightning's loop: the averaged weights scored on ``tiles``, the live ones put back."""
        self.on_validation_epoch_start()  # the averaged weights in, if any
        was_training = self.net.training
        self.net.eval()
        with self.trainer.precision_plugin.forward_context():
            for i in range(len(tiles)):  # a Dataset: indexed, not iterated
                x, y = tiles[i]
                self.validation_step((x.to(self.device), y.to(self.device)), i)
        self.net.train(was_training)
        if self._live is not None:
            self.net.load_state_dict(self._live)
            self._live = None
        m = self._val_metrics()
        self._val = []
        return m

    def update_best(self) -> None:
        # An epoch the time budget cut short skipped Lightning's validation: without this its weights would
        # be judged by the epoch before's score, and a run of one cut epoch would have no held-out score.
        if self.val_tiles is not None and self._validated_epoch != self.current_epoch:
            m = self._score_tiles(self.val_tiles)
            if m is not None:
                self.epoch_metrics.update(m)
            self._validated_epoch = self.current_epoch
        super().update_best()

    def validate_start(self) -> None:
        """Score the starting weights of a warm start on the held-out strokes; they are the weights to beat.

        A fine-tuning whose epochs all score worse than the model it began from (more than
        ``plan.select_tolerance`` below it) then ends with that model's weights, not with worse ones.
        """
        m = self._score_tiles(self.start_tiles)
        if m is None:
            return
        self.best_score = m["val_iou"] - 1e-3 * m["val_loss"]
        self.best_state = self.weights_to_keep()
        self.kept_epochs, self.kept_floor = 1, self.best_score
        self.best_epoch = -1  # epoch 0 in the metrics: the weights training started from
        self.best_val_iou = self.start_val_iou = m["val_iou"]

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        decay = self.plan.ema_decay
        if decay <= 0:
            return
        state = self.net.state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in state.items()}
            return
        # Shorter memory early on, so the average does not drag in the random initialisation.
        d = min(decay, (1 + self.global_step) / (10 + self.global_step))
        blend_into(self.ema, state, 1 - d)

    def weights_to_keep(self) -> dict[str, torch.Tensor]:
        """The weights that are validated and kept: the moving average if enabled, else the live ones."""
        state = self.ema if self.ema is not None else self.net.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def on_validation_epoch_start(self) -> None:
        self._val = []
        if self.ema is not None:
            self._live = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.net.load_state_dict(self.ema)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        labels = y[:, 0].long()
        k = self.plan.num_classes
        mask = labels > 0
        loss = sparse_ce_dice_loss(logits, y, dice_weight=0.0) * mask.sum()
        pred = logits.argmax(1) + 1
        # Confusion counts over painted pixels only: rows = truth, columns = prediction.
        idx = (labels[mask] - 1) * k + (pred[mask] - 1)
        conf = torch.bincount(idx, minlength=k * k).reshape(k, k).float()
        self._val.append(torch.cat([loss.detach().float().reshape(1), mask.sum().float().reshape(1), conf.reshape(-1)]))

    def on_validation_epoch_end(self) -> None:
        if self._live is not None:
            self.net.load_state_dict(self._live)
            self._live = None
        if self.trainer.sanity_checking:
            return
        m = self._val_metrics()
        if m is not None:
            self.epoch_metrics.update(m)
            self._validated_epoch = self.current_epoch

    def _val_metrics(self) -> dict[str, float] | None:
        """Held-out loss, mean IoU over the classes present and accuracy from the batches scored; None if none."""
        if not self._val:
            return None
        total = torch.stack(self._val).sum(0).cpu()
        k = self.plan.num_classes
        conf = total[2:].reshape(k, k)
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = conf.sum(1) > 0
        iou = (tp / union.clamp(min=1))[present]
        return {"val_loss": float(total[0] / total[1].clamp(min=1)), "val_iou": float(iou.mean()) if len(iou) else 0.0,
                "val_acc": float(tp.sum() / conf.sum().clamp(min=1))}

    def keep_if_best(self, m: dict[str, float]) -> None:
        """Average the current (averaged) weights into the kept ones if they score about as well as the best so far.

        The score is the held-out stroke IoU (ties: lower val loss). An epoch within
        ``plan.select_tolerance`` of the best joins the kept weights, which are the mean of every
        such epoch's weights (stochastic weight averaging over the plateau, Izmailov et al. 2018):
        on a few dozen held-out strokes such differences are noise, the dense score drifts from
        epoch to epoch along the plateau, and the mean of its epochs stands above most of them
        (ISBI, one run: epochs 12-26 each 0.734-0.749 dense mean IoU, the last of them 0.734,
        their mean 0.746). A new best that leaves an earlier member more than the tolerance
        behind starts the mean afresh. Without a validation split the latest weights are kept.
        """
        score = m["val_iou"] - 1e-3 * m["val_loss"] if "val_iou" in m else math.inf
        if self.best_state is None or score >= self.best_score - self.plan.select_tolerance:
            self.best_score = max(score, self.best_score)
            self.best_epoch = self.current_epoch
            weights = self.weights_to_keep()
            if (self.best_state is None or math.isinf(score) or self.kept_epochs < 1
                    or self.kept_floor < self.best_score - self.plan.select_tolerance):
                self.best_state, self.kept_epochs, self.kept_floor = weights, 1, score
            else:
                self.kept_epochs += 1
                blend_into(self.best_state, weights, 1.0 / self.kept_epochs)
                self.kept_floor = min(self.kept_floor, score)
            self.best_val_iou = m.get("val_iou", -1.0)
        if "val_iou" in m:
            m["best_val_iou"] = self.best_val_iou
            if self.start_val_iou is not None:
                m["start_val_iou"] = self.start_val_iou
            if m["val_iou"] > self.peak_val_iou + PLATEAU_MIN_GAIN:
                self.peak_val_iou, self.peak_epochs = m["val_iou"], self.current_epoch + 1
            m["peak_val_iou"], m["peak_epoch"] = self.peak_val_iou, float(self.peak_epochs)

    def saved_state(self) -> dict:
        return {
            "best_score": self.best_score,
            "best_val_iou": self.best_val_iou,
            "peak_val_iou": self.peak_val_iou,
            "peak_epochs": self.peak_epochs,
            "start_val_iou": self.start_val_iou,
            "kept_epochs": self.kept_epochs,
            "kept_floor": self.kept_floor,
            "ema": self.ema,
            "label_counts": self.label_counts.cpu(),
            # Kept starting weights are corrected for the shares they learnt under, not this run's.
            "train_prior": self.start_prior if self.best_epoch < 0 and self.start_prior is not None
            else (self.label_counts / self.label_counts.sum().clamp(min=1)).cpu().tolist(),
            "start_prior": self.start_prior,
        }

    def restore_state(self, own: dict) -> None:
        self.best_score = own.get("best_score", -math.inf)
        self.best_val_iou = own.get("best_val_iou", -1.0)
        self.peak_val_iou = own.get("peak_val_iou", -1.0)
        self.peak_epochs = own.get("peak_epochs", 0)
        self.start_val_iou = own.get("start_val_iou")
        # A checkpoint written before the kept weights were averaged holds one epoch's.
        self.kept_epochs = own.get("kept_epochs", 1 if own.get("best_state") is not None else 0)
        self.kept_floor = own.get("kept_floor", self.best_score)
        self.start_prior = own.get("start_prior")
        self.ema = own.get("ema")
        if own.get("label_counts") is not None:
            self.label_counts = own["label_counts"].to(torch.float64)
