"""Public segmentation API of the engine: plan, train (resumable), predict.

The job runner imports only from here; the modules behind it can be rearranged freely.
"""

from dlorch.core.engine.hooks import NoHooks, Progress, StopReason, TrainHooks, TrainResult
from dlorch.core.engine.segment.plan import SegmentationPlan, plan_segmentation
from dlorch.core.engine.segment.predict import load_model, predict_probabilities, predict_segmentation
from dlorch.core.engine.segment.train import train_segmentation

__all__ = [
    "NoHooks",
    "Progress",
    "SegmentationPlan",
    "StopReason",
    "TrainHooks",
    "TrainResult",
    "load_model",
    "plan_segmentation",
    "predict_probabilities",
    "predict_segmentation",
    "train_segmentation",
]
