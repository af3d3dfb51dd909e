"""Denoising prediction from a checkpoint: tiled sliding-window inference with Gaussian blending (tiling.py),
then for Noise2Void the posterior step (posterior.py)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from dlorch.core.blocks import WindowGrid
from dlorch.core.engine.checkpoint import load_network
from dlorch.core.engine.denoise.intensity import normalise_input
from dlorch.core.engine.denoise.module import CKPT_KEY, build_denoiser
from dlorch.core.engine.denoise.plan import DenoisingPlan
from dlorch.core.engine.denoise.posterior import POSTERIOR_REACH, estimate_noise_var, posterior_mean
from dlorch.core.engine.denoise.sure import blend_with_collab
from dlorch.core.engine.device import apply_threads, detect_runtime
from dlorch.core.engine.inputs import as_stack
from dlorch.core.engine.network import memory_format, placed
from dlorch.core.engine.tiling import blend_windows, window_batch, window_grid


def load_denoiser(checkpoint: pathlib.Path) -> tuple[torch.nn.Module, DenoisingPlan]:
    """Rebuild the network with its best weights from a training checkpoint (nothing else needed).

    Args:
        checkpoint: a ``.ckpt`` written by ``train_denoising``.

    Returns:
        (network in eval mode on CPU with its batch norms folded into its convolutions, its plan).

    Raises:
        ValueError: the file is not a dlorch denoising checkpoint.
    """
    net, plan, _ = load_network(checkpoint, key=CKPT_KEY, plan_type=DenoisingPlan, build=build_denoiser,
                                task="denoising")
    return net, plan


@dataclass
class Denoised:
    """A prediction and how it was made."""

    image: np.ndarray  # float32, the input's shape: the answer
    network_output: np.ndarray  # float32, the input's shape: the network alone (before the posterior step)
    noise_std: float | None  # estimated noise std in image units, when the posterior step ran


def denoise_grid(plan: DenoisingPlan, shape: tuple[int, ...], roi: list[int] | None = None) -> WindowGrid:
    """The prediction windows of a whole image or volume of ``shape`` (see ``tiling.window_grid``)."""
    return window_grid(shape, roi or plan.infer_roi, 2 ** (len(plan.filters) - 1), plan.infer_overlap)


def network_output(
    model: tuple[torch.nn.Module, DenoisingPlan], stack: np.ndarray, roi: list[int] | None = None,
    volume_shape: tuple[int, ...] | None = None, origin: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Tiled network prediction of a (Z, Y, X) stack, in the plan's normalised units.

    Args:
        model: network and plan from ``load_denoiser``.
        stack: (Z, Y, X) image of any real dtype.
        roi: prediction window (Y, X), or (Z, Y, X) for a 3D plan, instead of the plan's (tests use
            it to force tiling).
        volume_shape, origin: ``stack`` is the region at ``origin`` of a volume of this shape: the
            whole volume's windows are run, so the region comes out as in one pass over the volume.

    Returns:
        float32 (Z, Y, X), normalised like the plan's target.
    """
    net, plan = model
    runtime = detect_runtime()
    apply_threads(runtime)
    device = runtime.device
    layout = memory_format(plan.spatial_dims + 2)
    net = placed(net, device, layout)
    grid, batch = denoise_grid(plan, volume_shape or stack.shape, roi), window_batch(plan.infer_batch, device)
    corner = tuple(origin[-plan.spatial_dims :]) if origin else (0,) * plan.spatial_dims
    out = np.empty(stack.shape, dtype=np.float32)
    dtype = runtime.autocast_dtype

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return net(x.contiguous(memory_format=layout)).float()

    def windows(x: torch.Tensor) -> torch.Tensor:
        return blend_windows(x, grid, corner, predictor, batch, "reflect")

    with torch.inference_mode():
        if plan.spatial_dims == 3:  # the stack is one volume: (1, 1, Z, Y, X)
            out[:] = windows(torch.from_numpy(normalise_input(stack, plan)[None, None]).to(device))[0, 0].cpu().numpy()
        else:
            for z0 in range(0, stack.shape[0], plan.infer_batch):
                x = torch.from_numpy(normalise_input(stack[z0 : z0 + plan.infer_batch], plan)[:, None]).to(device)
                out[z0 : z0 + x.shape[0]] = windows(x)[:, 0].float().cpu().numpy()
    return out


def denoise_with_details(
    checkpoint: pathlib.Path | None,
    image: np.ndarray,
    *,
    model: tuple[torch.nn.Module, DenoisingPlan] | None = None,
    roi: list[int] | None = None,
    posterior: bool | None = None,
    noise_var: float | None = None,
    volume_shape: tuple[int, ...] | None = None,
    origin: tuple[int, ...] | None = None,
) -> Denoised:
    """``predict_denoising`` that also returns the network's own output and the estimated noise level.

    Args:
        checkpoint: a ``.ckpt`` written by ``train_denoising`` (unused when ``model`` is given).
        image: (Y, X) or (Z, Y, X) image of any real dtype.
        model: a ``load_denoiser`` result to reuse.
        roi: prediction window (Y, X) instead of the plan's.
        posterior: run the posterior step (Noise2Void only); None follows the plan.
        noise_var: the noise variance for the posterior step, in the plan's normalised units
            (blockwise prediction estimates it once per volume); by default estimated here.
        volume_shape, origin: ``image`` is the region at ``origin`` of a volume of this shape, read
            with ``region_for`` (the whole volume's windows, and the posterior step's reach).

    Returns:
        The prediction, the network output and the noise estimate.
    """
    stack = as_stack(image)
    model = model if model is not None else load_denoiser(checkpoint)
    plan = model[1]
    mu = network_output(model, stack, roi, volume_shape=volume_shape, origin=origin)
    shape = np.shape(image)
    scale, offset = np.float32(plan.target_std), np.float32(plan.target_mean)
    raw = mu * scale + offset
    if not uses_posterior(plan, posterior):
        return Denoised(raw.reshape(shape), raw.reshape(shape), None)
    if noise_var is None:
        noise_var = volume_noise_var(stack, mu, plan)
    out = np.empty(stack.shape, dtype=np.float32)
    for z0 in range(0, stack.shape[0], plan.infer_batch):
        part = slice(z0, z0 + plan.infer_batch)
        out[part] = posterior_mean(normalise_input(stack[part], plan), mu[part], noise_var)
    out *= scale
    out += offset
    return Denoised(out.reshape(shape), raw.reshape(shape), float(np.sqrt(noise_var)) * float(plan.input_std))


def uses_posterior(plan: DenoisingPlan, asked: bool | None = None) -> bool:
    """Whether the posterior step runs: Noise2Void models, when the plan (or the caller) says so."""
    return bool(plan.posterior if asked is None else asked) and plan.mode == "n2v"


def volume_noise_var(stack: np.ndarray, mu: np.ndarray, plan: DenoisingPlan) -> float:
    """The noise variance (normalised units) from up to 32 evenly spread slices: plenty for one number."""
    sample = np.unique(np.linspace(0, stack.shape[0] - 1, min(32, stack.shape[0])).round().astype(int))
    return estimate_noise_var(normalise_input(stack[sample], plan), mu[sample])


def region_for(plan: DenoisingPlan, shape: tuple[int, ...], core: tuple[tuple[int, int], ...]
               ) -> tuple[tuple[int, int], ...]:
    """What a block ``core`` of a volume of ``shape`` must read to come out as in one whole pass.

    The network needs the whole volume's windows over the core; where the posterior step runs, its
    local statistics reach ``POSTERIOR_REACH`` pixels further in-plane, so the windows over that
    wider core are read.
    """
    wider = list(core)
    for ax in (-2, -1) if uses_posterior(plan) else ():
        a, b = core[ax]
        wider[ax] = (max(0, a - POSTERIOR_REACH), min(shape[ax], b + POSTERIOR_REACH))
    return denoise_grid(plan, shape).read_region(tuple(wider))


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
    clipped, so float data keep their range and sign. Noise2Void models then combine their
    prediction with the noisy pixel (``posterior.py``) when the plan says so, and, where the plan
    has ``classical``, blend the result slice by slice with collaborative filtering by SURE
    (``sure.py``: SURE on up to three slices, the filter once on every slice whose share is above 0;
    a whole-image step: blockwise prediction runs ``denoise_with_details`` alone).

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
    model = model if model is not None else load_denoiser(checkpoint)
    done = denoise_with_details(checkpoint, image, model=model, roi=roi)
    plan = model[1]
    if not plan.classical:
        return done.image
    # The blend's divergence needs the same network and posterior on a perturbed copy: the same noise level.
    noise_var = None if done.noise_std is None else (done.noise_std / float(plan.input_std)) ** 2

    def again(stack: np.ndarray) -> np.ndarray:
        return as_stack(denoise_with_details(None, stack, model=model, roi=roi, noise_var=noise_var).image)

    stack = as_stack(image)
    return blend_with_collab(stack, as_stack(done.image), again, seed=plan.seed,
                             slicewise=plan.spatial_dims == 2).image.reshape(np.shape(image))
