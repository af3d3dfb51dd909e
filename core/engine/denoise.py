"""Public denoising API of the engine: plan, train (resumable), predict.

The job runner imports only from here; the modules behind it can be rearranged freely.

    plan = plan_denoising(image, target=None, epochs=None, time_budget=None, mode=None)  # DenoisingPlan
    result = train_denoising(image, None, plan, workdir=dir, resume_from=None, hooks=hooks)  # TrainResult
    clean = predict_denoising(result.checkpoint, image)  # float32, image.shape
"""

from dlorch.core.engine.denoise_plan import DenoisingPlan, plan_denoising
from dlorch.core.engine.denoise_predict import load_denoiser, predict_denoising
from dlorch.core.engine.denoise_train import train_denoising
from dlorch.core.engine.hooks import NoHooks, Progress, StopReason, TrainHooks, TrainResult

__all__ = [
    "DenoisingPlan",
    "NoHooks",
    "Progress",
    "StopReason",
    "TrainHooks",
    "TrainResult",
    "load_denoiser",
    "plan_denoising",
    "predict_denoising",
    "train_denoising",
]
