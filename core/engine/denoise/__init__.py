"""Public denoising API of the engine: plan, train (resumable), predict.

The job runner imports only from here; the modules behind it can be rearranged freely.

    plan = plan_denoising(image, target=None, epochs=None, time_budget=None, mode=None)  # DenoisingPlan
    result = train_denoising(image, None, plan, workdir=dir, resume_from=None, hooks=hooks)  # TrainResult
    clean = predict_denoising(result.checkpoint, image)  # float32, image.shape

Modes: "n2v" (Noise2Void, the noisy image alone; automatic without a target), "n2n" (a
second noisy acquisition as target), "care" (a clean target; the default with a target).

The way of a job:

    denoise_inputs.py     checks (one-line ValueErrors naming the fix), mean/std
    denoise_calibrate.py  ~2 s of real steps -> fastest seconds/step on this machine
    denoise_plan.py       derive_denoising_plan() (pure): patch, widths, batch, blind spot, epochs, reasons
    denoise_train.py      Lightning loop; checkpoint at every epoch end; stop/resume; time budget
      denoise_data.py     held-out slices (or rows), seeded batches with flips/90° turns, fixed val tiles
      blindspot.py        Noise2Void masking (grid of pixels replaced by neighbours) and masked MSE
      denoise_module.py   DynUNet, lr by max(step share, time share), best weights by held-out loss
    denoise_predict.py    checkpoint -> MONAI sliding window (gaussian) -> un-normalise
      denoise_posterior.py  n2v: posterior mean of network output and noisy pixel, noise level estimated
"""

from dlorch.core.engine.denoise.plan import DenoisingPlan, plan_denoising
from dlorch.core.engine.denoise.predict import load_denoiser, predict_denoising
from dlorch.core.engine.denoise.train import train_denoising
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
