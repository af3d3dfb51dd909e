"""Denoising: the engine's public API for this task.

The job runner imports only from here; the modules behind it can be rearranged freely.

    plan = plan_denoising(image, target=None, epochs=None, time_budget=None, mode=None)  # DenoisingPlan
    result = train_denoising(image, None, plan, workdir=dir, resume_from=None, hooks=hooks)  # TrainResult
    clean = predict_denoising(result.checkpoint, image)  # float32, image.shape

Modes: "n2v" (Noise2Void, the noisy image alone; automatic without a target), "n2n" (a
second noisy acquisition as target), "care" (a clean target; the default with a target).

Blockwise denoising of a large volume loads the model once (``load_denoiser``), estimates the
noise level once (``network_output``, ``volume_noise_var``) and reads each block with the margin
its windows and the posterior step need (``region_for``, ``denoise_with_details``).

The way of a job (shared parts in ``core/engine/``):

    ../inputs.py       checks (one-line ValueErrors naming the fix)
    intensity.py       mean/std normalisation, no clipping
    plan.py            derive_denoising_plan() (pure) with ../schedule.py: patch, widths, batch, blind
                       spot, epochs, reasons; the fastest of ~2 s of real steps (../calibrate.py)
    train.py           the shared run (../trainer.py, ../runcontrol.py)
      data.py          held-out slices (or rows), seeded batches with flips/90° turns, fixed val tiles
      blindspot.py     Noise2Void masking (grid of pixels replaced by neighbours) and masked MSE
      module.py        masked MSE, best weights by held-out loss (../module.py: lr by max(step share, time share))
    predict.py         checkpoint (../checkpoint.py) -> windows with Gaussian blending (../tiling.py)
                       -> un-normalise
      posterior.py     n2v: posterior mean of network output and noisy pixel, noise level estimated
      sure.py          n2v, whole images (predict_denoising): blend with collaborative filtering per
                       slice by Stein's unbiased risk estimate
        collab.py      BM3D's two passes (block matching, 3D transform, hard threshold, Wiener)
        noiselevel.py  noise std from the patch covariance's smallest eigenvalues, read on 128x128 tiles
"""

from dlorch.core.engine.denoise.plan import DenoisingPlan, plan_denoising
from dlorch.core.engine.denoise.predict import (denoise_with_details, load_denoiser, network_output, predict_denoising,
                                                region_for, uses_posterior, volume_noise_var)
from dlorch.core.engine.denoise.train import train_denoising
from dlorch.core.engine.hooks import NoHooks, Progress, StopReason, TrainHooks, TrainResult

__all__ = [
    "DenoisingPlan",
    "NoHooks",
    "Progress",
    "StopReason",
    "TrainHooks",
    "TrainResult",
    "denoise_with_details",
    "load_denoiser",
    "network_output",
    "plan_denoising",
    "predict_denoising",
    "region_for",
    "train_denoising",
    "uses_posterior",
    "volume_noise_var",
]
