"""Warm start: a training that begins from another segmentation model's weights (fine-tuning).

After a round of corrections the wizard retrains from the model the user chose, instead of from
random weights: the network it learnt is kept (its depth, widths, input scale, patch, loss and
augmentation come from its plan), the classes must be the same, and only the schedule is planned
anew for the new labels, with a shorter default budget since training starts close to its goal.
Resumed attempts of such a job resume from their own checkpoints, never from the model again.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from pydantic import ValidationError

from dlorch.core.engine.checkpoint import read_checkpoint
from dlorch.core.engine.device import detect_runtime
from dlorch.core.engine.segment.geometry import DEFAULTS
from dlorch.core.engine.segment.module import CKPT_KEY, build_segmenter
from dlorch.core.engine.segment.plan import SegmentationPlan, plan_segmentation

# Share of the device's default training budget a warm start gets when the user gives no budget.
WARM_BUDGET_SHARE = 0.5
# The peak learning rate of a warm start, as a share of the plan's: a full one would first undo
# much of what the model knows (measured on ISBI rounds, docs/experiments.md).
WARM_LR_SHARE = 0.5
# What a model's plan fixes about its network and its training; a warm start keeps them.
NETWORK_FIELDS = ("spatial_dims", "anisotropy", "input_scale", "filters", "norm", "patch_size", "batch_size",
                  "dice_weight", "augment", "infer_roi", "infer_overlap", "infer_batch", "tta")


def read_model(checkpoint: pathlib.Path, shown: str | None = None) -> tuple[SegmentationPlan, dict[str, torch.Tensor]]:
    """A segmentation model's plan and the weights it predicts with (its best, averaged ones; BN unfolded).

    Raises:
        ValueError: the file is no dlorch segmentation checkpoint (one line, naming ``shown``).
    """
    shown = shown or str(checkpoint)
    ckpt = read_checkpoint(checkpoint, shown)
    own = ckpt.get(CKPT_KEY)
    if not own or "plan" not in own:
        raise ValueError(f"{shown} is not a dlorch segmentation model; start from a segmentation training's model")
    try:
        plan = SegmentationPlan.model_validate(own["plan"])
    except ValidationError:
        raise ValueError(f"{shown} holds a damaged plan; start from the .ckpt its training wrote") from None
    state = own.get("best_state")
    if state is None:
        state = {k[len("net."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("net.")}
    return plan, state


def source_prior(checkpoint: pathlib.Path) -> list[float] | None:
    """The class shares a model's training saw (its prior correction undoes them), or None if it has none."""
    prior = read_checkpoint(checkpoint).get(CKPT_KEY, {}).get("train_prior")
    return [float(p) for p in prior] if prior is not None else None


def warm_plan(image: np.ndarray, labels: np.ndarray, source: SegmentationPlan, *, epochs: int | None = None,
              time_budget: float | None = None, shown: str = "the model") -> SegmentationPlan:
    """The plan of a training that starts from a model whose plan is ``source``.

    The schedule is planned for these labels (a default budget of ``WARM_BUDGET_SHARE`` of the
    device's when neither ``epochs`` nor ``time_budget`` is given), the network and its training
    rules are the model's, the peak learning rate ``WARM_LR_SHARE`` of the plan's.

    Raises:
        ValueError: the labels' classes differ from the model's, or its network does not fit this image.
    """
    if epochs is None and time_budget is None:
        time_budget = DEFAULTS[detect_runtime().accelerator].budget_s * WARM_BUDGET_SHARE
    plan = plan_segmentation(image, labels, epochs=epochs, time_budget=time_budget)
    if plan.num_classes != source.num_classes:
        raise ValueError(f"labels have {plan.num_classes} classes but {shown} was trained on {source.num_classes}; "
                         "start from a model of the same classes, or train without --init-from")
    if source.spatial_dims == 3 and plan.image_shape[0] < source.patch_size[0]:
        raise ValueError(f"{shown} is a 3D network of {source.patch_size[0]}-slice patches and the image has "
                         f"{plan.image_shape[0]} slices; start from a 2D model, or train without --init-from")
    network = {f: getattr(source, f) for f in NETWORK_FIELDS}
    lr = plan.lr * WARM_LR_SHARE
    what = f"{source.spatial_dims}D U-Net, widths {source.filters}, patch {source.patch_size}, scale {source.input_scale}"
    return plan.model_copy(update={**network, "lr": lr, "warm_start": True, "reasons": [
        *plan.reasons, f"warm start from {shown}: its network ({what}) and training rules; peak lr {lr:g} "
                       f"({WARM_LR_SHARE:g} of the plan's)"]})


def initial_weights(checkpoint: pathlib.Path, plan: SegmentationPlan, shown: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """The weights a warm-started training begins with, checked against the network ``plan`` builds.

    Raises:
        ValueError: another task's checkpoint, other classes, or weights that do not fit the network.
    """
    shown = shown or str(checkpoint)
    source, state = read_model(checkpoint, shown)
    if source.num_classes != plan.num_classes:
        raise ValueError(f"{shown} was trained on {source.num_classes} classes and the labels have "
                         f"{plan.num_classes}; start from a model of the same classes")
    try:
        build_segmenter(plan).load_state_dict(state)
    except RuntimeError:  # torch lists every mismatched tensor, on a hundred lines
        raise ValueError(f"{shown}: its weights do not fit the network of this training's plan (another depth, "
                         "width or geometry); start from a model of this plan's network") from None
    return state
