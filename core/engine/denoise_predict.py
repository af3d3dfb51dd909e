"""Denoising prediction from a checkpoint: tiled sliding-window inference with Gaussian blending."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from dlorch.core.engine.denoise_module import CKPT_KEY, build_denoiser
from dlorch.core.engine.denoise_plan import DenoisingPlan
from dlorch.core.engine.device import apply_threads, detect_runtime
from dlorch.core.engine.inputs import as_stack


def load_denoiser(checkpoint: pathlib.Path) -> tuple[torch.nn.Module, DenoisingPlan]:
    """Rebuild the network with its best weights from a training checkpoint (nothing else needed).

    Args:
        checkpoint: a ``.ckpt`` written by ``train_denoising``.

    Returns:
        (network in eval mode on CPU, its plan).

    Raises:
        ValueError: the file is not a dlorch denoising checkpoint.
    """
    # weights_only: a checkpoint may come from another node's store; never unpickle code from it.
    ckpt = torch.load(pathlib.Path(checkpoint), map_location="cpu", weights_only=True)
    own = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not own or "plan" not in own:
        raise ValueError(f"{checkpoint} is not a dlorch denoising checkpoint; pass a .ckpt from train_denoising")
    plan = DenoisingPlan.model_validate(own["plan"])
    net = build_denoiser(plan)
    state = own.get("best_state")
    if state is None:
        prefix = "net."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval(), plan


def predict_denoising(
    checkpoint: pathlib.Path | None,
    image: np.ndarray,
    *,
    model: tuple[torch.nn.Module, DenoisingPlan] | None = None,
    roi: list[int] | None = None,
) -> np.ndarray:
    """Denoise an image with a trained model.

    The input is normalised with the training image's mean and std (the model learnt the
    noise at that scale) and the output un-normalised with the target's; nothing is rounded or
    clipped, so float data keep their range and sign.

    Args:
        checkpoint: a ``.ckpt`` written by ``train_denoising`` (unused when ``model`` is given).
        image: (Y, X) or (Z, Y, X) image of any real dtype; slices are denoised one by one.
        model: a ``load_denoiser`` result to reuse (a node denoising many blocks loads it once).
        roi: prediction window (Y, X) instead of the plan's (tests use it to force tiling).

    Returns:
        float32 array of the image's shape.

    Raises:
        ValueError: the image is not 2D/3D, empty or non-finite, or the checkpoint is not a
            denoising checkpoint.
    """
    stack = as_stack(image)
    net, plan = model if model is not None else load_denoiser(checkpoint)
    runtime = detect_runtime()
    apply_threads(runtime)
    device = runtime.device
    net = net.to(device).to(memory_format=torch.channels_last)
    # The window may exceed the image by at most the network's size multiple: the image is
    # padded up to the window, and the U-Net needs sizes divisible by 2**downsamplings.
    multiple = 2 ** (len(plan.filters) - 1)
    window = roi or plan.infer_roi
    window = [max(multiple, min(r, -(-s // multiple) * multiple)) for r, s in zip(window, stack.shape[-2:])]
    mean, std = np.float32(plan.input_mean), np.float32(plan.input_std)
    out = np.empty(stack.shape, dtype=np.float32)
    dtype = runtime.autocast_dtype

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return net(x.contiguous(memory_format=torch.channels_last)).float()

    with torch.inference_mode():
        for z0 in range(0, stack.shape[0], plan.infer_batch):
            part = (stack[z0 : z0 + plan.infer_batch].astype(np.float32) - mean) / std
            x = torch.from_numpy(part[:, None]).to(device)
            pred = sliding_window_inference(
                x, window, plan.infer_batch, predictor, overlap=plan.infer_overlap, mode="gaussian", padding_mode="reflect"
            )
            out[z0 : z0 + x.shape[0]] = pred[:, 0].float().cpu().numpy()
    out *= np.float32(plan.target_std)
    out += np.float32(plan.target_mean)
    return out.reshape(np.shape(image))
