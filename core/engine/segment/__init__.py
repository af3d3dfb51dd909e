"""Segmentation from sparse painted strokes: the engine's public API for this task.

The job runner imports only from here; the modules behind it can be rearranged freely.

    plan = plan_segmentation(image, labels, epochs=None, time_budget=None)  # SegmentationPlan
    result = train_segmentation(image, labels, plan, workdir=dir, resume_from=None, hooks=hooks)  # TrainResult
    labels = predict_segmentation(result.checkpoint, image)  # uint8 1..K, image.shape

Blockwise prediction of a large volume loads the model once (``load_model``), normalises every
block alike (``intensity_stats``), estimates the class priors once (``estimate_priors``) and runs
each block with the whole volume's windows (``prediction_grid``, ``predict_probabilities``).

The way of a job (shared parts in ``core/engine/``):

    ../inputs.py     checks (one-line ValueErrors naming the fix)
    geometry.py      2D or 3D (../anisotropy.py), input scale, patch, widths, batch from memory
    plan.py          derive_plan() (pure) with ../schedule.py: epochs, budget, plateau stop, TTA, reasons;
                     the median of a few real steps (../calibrate.py)
    train.py         the shared run (../trainer.py, ../runcontrol.py) with segmentation's rules
      holdout.py     whole strokes held back for validation (components.py finds them)
      sampling.py    class-balanced batches centred on painted pixels; fixed validation tiles
      module.py      CE + soft Dice on painted pixels (losses.py), augmentation on the training device
                     (augment.py), weight averaging, best weights by held-out stroke IoU (../module.py: lr)
    predict.py       checkpoint (../checkpoint.py) -> windows with Gaussian blending (../tiling.py)
                     -> class probabilities, rescaled to the image's class priors (priors.py)
    zoo.py           named variants of a plan: the candidates a wizard trains side by side
    warmstart.py     training from a chosen model's weights (its network kept, the schedule re-planned)
    accepted.py      labels accepted from a prediction, weighed less than painted ones in the loss
"""

from dlorch.core.engine.hooks import NoHooks, Progress, StopReason, TrainHooks, TrainResult
from dlorch.core.engine.segment.intensity import IntensityStats, intensity_stats
from dlorch.core.engine.segment.plan import SegmentationPlan, plan_segmentation
from dlorch.core.engine.segment.predict import (labels_from_probabilities, load_model, predict_probabilities,
                                                predict_segmentation, predict_with_confidence, prediction_grid)
from dlorch.core.engine.segment.priors import estimate_priors
from dlorch.core.engine.segment.train import train_segmentation
from dlorch.core.engine.segment.warmstart import read_model, warm_plan
from dlorch.core.engine.segment.zoo import apply_variant, candidate_names

__all__ = [
    "IntensityStats",
    "NoHooks",
    "Progress",
    "SegmentationPlan",
    "StopReason",
    "TrainHooks",
    "TrainResult",
    "apply_variant",
    "candidate_names",
    "estimate_priors",
    "intensity_stats",
    "labels_from_probabilities",
    "load_model",
    "plan_segmentation",
    "predict_probabilities",
    "predict_segmentation",
    "predict_with_confidence",
    "prediction_grid",
    "read_model",
    "train_segmentation",
    "warm_plan",
]
