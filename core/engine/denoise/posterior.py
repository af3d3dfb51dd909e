"""Give a blind-spot prediction back the pixel it never saw: Gaussian posterior mean with an estimated noise level.

A Noise2Void network predicts each pixel from its neighbours only, so whatever a pixel
holds that its neighbours do not predict (fine grain, single-pixel detail) is lost, and
the result is blurrier than the data allow. With additive Gaussian noise of variance
``s_n`` and a prediction ``mu`` whose own uncertainty is ``s_s``, the best estimate given
the noisy value ``y`` is the posterior mean ``mu + s_s / (s_s + s_n) * (y - mu)``
(Laine et al. 2019, "High-quality self-supervised deep image denoising"; Krull et al.,
"Probabilistic Noise2Void"). Here ``s_s + s_n`` is the local mean of the squared
residual ``(y - mu)**2`` and ``s_n`` a low percentile of it over the image: where the
prediction is near perfect, the residual is noise alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Local statistics are Gaussian-weighted over ~4 px: enough pixels (~200) that a window's
# mean squared residual is within ~10% of its expectation, small enough to follow edges.
WINDOW_SIGMA = 4.0
# The noise floor is this percentile of the local residual power: low enough to find the
# well-predicted (flat) regions, high enough that their sampling spread does not bias it far.
NOISE_PERCENTILE = 1.0
# Pixels whose 3x3-ish neighbourhood barely varies (zero padding, saturation) carry no noise
# and would fake a zero floor; windows touching them are ignored. "Barely" is this share of
# the image's typical local power, far below what any noisy region reaches by chance.
DEAD_SHARE = 1e-4
# How far, in-plane, a pixel's posterior depends on the prediction around it (the local mean's radius).
POSTERIOR_REACH = int(3 * WINDOW_SIGMA + 0.5)
_MAX_SAMPLES = 2_000_000


def local_mean(stack: np.ndarray, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """Gaussian-weighted local mean of every (Y, X) slice of a (Z, Y, X) float array (mirrored edges)."""
    radius = int(3 * sigma + 0.5)  # POSTERIOR_REACH at the default sigma
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    # Reflect padding needs the pad to be smaller than the axis; replicate covers tiny slices.
    mode = "reflect" if min(stack.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)[:, 0]
    # Shifted adds in a fixed order, not conv2d: a convolution's rounding can change with the batch
    # and image size it is given, and blockwise denoising must equal the whole pass bit for bit.
    h, w = x.shape[-2] - 2 * radius, x.shape[-1] - 2 * radius
    rows = sum(k[i] * x[:, :, i : i + w] for i in range(len(k)))
    return sum(k[i] * rows[:, i : i + h] for i in range(len(k))).numpy()


def estimate_noise_var(noisy: np.ndarray, predicted: np.ndarray, sigma: float = WINDOW_SIGMA) -> float:
    """Variance of the additive noise: a low percentile of the local residual power.

    Args:
        noisy: (Z, Y, X) noisy image (normalised units).
        predicted: (Z, Y, X) blind-spot prediction of it.
        sigma: window of the local statistics.

    Returns:
        The noise variance in the units of ``noisy`` squared (0 for a constant image).
    """
    power = local_mean((noisy - predicted) ** 2, sigma)
    activity = local_mean((noisy - local_mean(noisy, 1.0)) ** 2, 1.0)
    step = max(1, activity.size // _MAX_SAMPLES)
    dead = activity <= DEAD_SHARE * float(np.percentile(activity.reshape(-1)[::step], 99))
    keep = local_mean(dead.astype(np.float32), sigma) < 1e-3
    values = power[keep]
    if values.size == 0:
        return 0.0
    step = max(1, values.size // _MAX_SAMPLES)
    return float(np.percentile(values[::step], NOISE_PERCENTILE))


def posterior_mean(
    noisy: np.ndarray, predicted: np.ndarray, noise_var: float, sigma: float = WINDOW_SIGMA
) -> np.ndarray:
    """Combine a prediction with the noisy pixel, weighted by how well the prediction explains its window.

    Args:
        noisy: (Z, Y, X) noisy image.
        predicted: (Z, Y, X) blind-spot prediction.
        noise_var: variance of the additive noise (``estimate_noise_var``).
        sigma: window of the local statistics.

    Returns:
        float32 (Z, Y, X) estimate; equals ``predicted`` where the residual is noise alone and
        moves towards ``noisy`` where the prediction misses structure.
    """
    residual = noisy - predicted
    power = local_mean(residual**2, sigma)
    weight = np.clip(1.0 - noise_var / np.maximum(power, 1e-12), 0.0, 1.0)
    return (predicted + weight * residual).astype(np.float32)
