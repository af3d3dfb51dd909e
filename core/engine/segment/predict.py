"""Segmentation prediction from a checkpoint: windows with Gaussian blending (tiling.py), class priors (priors.py)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from dlorch.core.blocks import WindowGrid
from dlorch.core.engine.checkpoint import load_network
from dlorch.core.engine.device import apply_threads, detect_runtime
from dlorch.core.engine.inputs import as_stack
from dlorch.core.engine.network import memory_format, placed
from dlorch.core.engine.segment.intensity import IntensityStats, normalize
from dlorch.core.engine.segment.module import CKPT_KEY, build_segmenter
from dlorch.core.engine.segment.plan import SegmentationPlan
from dlorch.core.engine.segment.priors import adjust_priors, estimate_priors
from dlorch.core.engine.tiling import blend_windows, window_batch, window_grid


def load_model(checkpoint: pathlib.Path) -> tuple[torch.nn.Module, SegmentationPlan]:
    """Rebuild the network with its best weights from a training checkpoint (nothing else needed).

    Args:
        checkpoint: a ``.ckpt`` written by ``train_segmentation``.

    Returns:
        (network in eval mode on CPU with its batch norms folded into its convolutions, its plan
        with the class shares training saw as ``train_prior``).

    Raises:
        ValueError: the file is not a dlorch segmentation checkpoint.
    """
    net, plan, own = load_network(checkpoint, key=CKPT_KEY, plan_type=SegmentationPlan, build=build_segmenter,
                                  task="segmentation")
    if own.get("train_prior") and sum(own["train_prior"]) > 0:
        plan = plan.model_copy(update={"train_prior": list(own["train_prior"])})
    return net, plan


def predict_probabilities(checkpoint: pathlib.Path | None, image: np.ndarray, *,
                          stats: IntensityStats | None = None,
                          model: tuple[torch.nn.Module, SegmentationPlan] | None = None,
                          priors: np.ndarray | str | None = "estimate", tta: bool | None = None,
                          volume_shape: tuple[int, ...] | None = None,
                          origin: tuple[int, ...] | None = None) -> np.ndarray:
    """Class probabilities for every pixel.

    Args:
        checkpoint: a ``.ckpt`` written by ``train_segmentation`` (unused when ``model`` is given).
        image: (Y, X) or (Z, Y, X) image of any real dtype.
        stats: intensity statistics to normalise with; by default the image's own. Blockwise
            prediction passes the whole volume's, so every block is normalised alike.
        model: a ``load_model`` result to reuse (a node predicting many blocks loads it once).
        priors: "estimate" rescales the posteriors to this image's class priors, estimated by EM
            (see priors.py); an array of K priors uses those (e.g. estimated once for a whole
            volume predicted blockwise); None returns the network's raw posteriors.
        tta: test-time augmentation: average the posteriors over the 8 in-plane flips and 90-degree
            rotations of every window (8x the compute; smoother, less orientation-biased boundaries).
            In-plane only, so it also holds for anisotropic volumes. None: as the plan chose (``plan.choose_tta``).
        volume_shape, origin: ``image`` is the region at ``origin`` of a volume of this shape (a
            block read with ``prediction_grid(...).read_region``): the whole volume's windows are
            run, so the block's core comes out as in one pass over the volume. Voxels outside the
            core that no whole window covers are NaN.

    Returns:
        float32 array (K, *image.shape); channel c holds the probability of class c + 1.
    """
    stack = as_stack(image)
    net, plan = model if model is not None else load_model(checkpoint)
    tta = plan.tta if tta is None else tta
    runtime = detect_runtime()
    apply_threads(runtime)
    device = runtime.device
    layout = memory_format(plan.spatial_dims + 2)
    net = placed(net, device, layout)
    norm = normalize(stack, stats)
    grid = prediction_grid(plan, volume_shape or stack.shape)
    corner = tuple(origin[-plan.spatial_dims :]) if origin else (0,) * plan.spatial_dims
    out = np.empty((plan.num_classes, *stack.shape), dtype=np.float32)
    dtype = runtime.autocast_dtype

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return torch.softmax(net(x.contiguous(memory_format=layout)).float(), dim=1)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return dihedral_mean(forward, x) if tta else forward(x)

    def windows(x: torch.Tensor) -> torch.Tensor:
        return blend_windows(x, grid, corner, predictor, window_batch(plan.infer_batch, device), "replicate")

    with torch.inference_mode():
        if plan.spatial_dims == 3:  # the stack is one volume: (1, 1, Z, Y, X)
            out[:] = windows(torch.from_numpy(norm[None, None]).to(device))[0].float().cpu().numpy()
        else:  # slices predicted in batches: (B, 1, Y, X)
            for z0 in range(0, stack.shape[0], plan.infer_batch):
                x = torch.from_numpy(norm[z0 : z0 + plan.infer_batch, None]).to(device)
                out[:, z0 : z0 + x.shape[0]] = windows(x).float().cpu().numpy().transpose(1, 0, 2, 3)
    if priors is not None and plan.train_prior:
        train_prior = np.asarray(plan.train_prior)
        target = estimate_priors(out, train_prior) if isinstance(priors, str) else np.asarray(priors, dtype=float)
        out = adjust_priors(out, train_prior, target)
    return out.reshape((plan.num_classes, *np.shape(image)))


def prediction_grid(plan: SegmentationPlan, shape: tuple[int, ...]) -> WindowGrid:
    """The prediction windows of a whole image or volume of ``shape`` (see ``tiling.window_grid``)."""
    return window_grid(shape, plan.infer_roi, 2 ** (len(plan.filters) - 1) * plan.input_scale, plan.infer_overlap)


def dihedral_mean(forward, x: torch.Tensor) -> torch.Tensor:
    """Mean of ``forward`` over the 8 flips/rotations of the last two axes, each mapped back.

    The set is a group, so the result is itself equivariant: predicting a rotated image gives the
    rotated prediction (a test checks it).
    """
    total = None
    for k in range(4):
        for flip in (False, True):
            t = torch.rot90(x, k, dims=(-2, -1))
            if flip:
                t = torch.flip(t, dims=(-1,))
            y = forward(t)
            if flip:
                y = torch.flip(y, dims=(-1,))
            y = torch.rot90(y, -k, dims=(-2, -1))
            total = y if total is None else total + y
    return total / 8


def predict_segmentation(checkpoint: pathlib.Path, image: np.ndarray, tta: bool | None = None) -> np.ndarray:
    """Label map of an image: the most probable class of every pixel.

    Args:
        checkpoint: a ``.ckpt`` written by ``train_segmentation``.
        image: (Y, X) or (Z, Y, X) image of any real dtype.
        tta: average over the 8 in-plane flips/rotations (see ``predict_probabilities``); None: as planned.

    Returns:
        uint8 array of the image's shape with values 1..K.
    """
    return labels_from_probabilities(predict_probabilities(checkpoint, image, tta=tta))


def predict_with_confidence(checkpoint: pathlib.Path, image: np.ndarray,
                            tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label map of an image and how sure the model is of every pixel.

    Args:
        checkpoint, image, tta: as for ``predict_segmentation``.

    Returns:
        (uint8 labels 1..K, uint8 confidence 0..255: the chosen class's probability x 255, after the
        class priors' correction), both of the image's shape.
    """
    probs = predict_probabilities(checkpoint, image, tta=tta)
    return labels_from_probabilities(probs), confidence_from_probabilities(probs)


def confidence_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """The highest class probability of every pixel of (K, ...) probabilities, as uint8 (x 255, rounded)."""
    best = probs.max(axis=0)
    return np.clip(np.rint(best * 255.0), 0, 255).astype(np.uint8)


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """The most probable class of every pixel of (K, ...) probabilities, as uint8 1..K (ties: the lower class).

    One comparison per class over contiguous planes, instead of ``argmax(0)``, which walks the
    class axis with a stride of the whole image: on a 2 x 1024 x 1024 block of random
    probabilities 6 ms instead of 34 (one thread).
    """
    best = probs[0].copy()
    labels = np.ones(best.shape, dtype=np.uint8)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        np.putmask(labels, higher, k + 1)
        np.maximum(best, probs[k], out=best)
    return labels
