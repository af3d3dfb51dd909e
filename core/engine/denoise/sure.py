"""Blend the network's denoising with collaborative filtering, slice by slice, by Stein's unbiased risk estimate.

With additive Gaussian noise of std ``sigma`` on ``N`` pixels, the mean squared error of any
(weakly differentiable) estimate ``f(y)`` has the unbiased estimate (Stein 1981)

    SURE(f) = ||y - f(y)||^2 - N sigma^2 + 2 sigma^2 div f(y),

computable without the clean image. The divergence comes from one extra evaluation on a
perturbed input, ``b . (f(y + eps b) - f(y)) / eps`` with ``b`` standard normal (Ramani, Blu and
Unser 2008, "Monte-Carlo SURE"). For the blend ``f_n + a (f_c - f_n)`` of the network's output
``f_n`` and the classical filter's ``f_c`` (``collab.py``), SURE is a quadratic in ``a``; its
minimum, clipped to [0, 1], is the weight. The perturbed filter matches its blocks afresh: with
the first call's matches kept, the divergence misses how the matches follow the noise, and SURE
came out 17% below the true error (ISBI slice 10, sigma 25: 124 against 150; re-matched 148).
Where the network is about as good as the filter, the two share (ISBI 10 after 120 s: ``a`` 0.61,
0.3 dB above either); where it learnt too little in its budget (a photograph in 30 s on a CPU),
the filter takes it all. The noise std is estimated from the image (``noiselevel.py``), never asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dlorch.core.engine.denoise.collab import PATCH, collab_filter
from dlorch.core.engine.denoise.noiselevel import estimate_sigma

# The perturbation's size, in noise stds: small enough that the filters stay close to linear over
# it, large enough to stay far above float32 rounding.
EPS_SHARE = 0.05
# The probe's random stream: a seed pair no one draws their noise from (a probe equal to the noise
# itself, as default_rng(0) twice gives, makes the divergence meaningless).
PROBE_STREAM = 0x5E7E
_SIGMA_SLICES = 8  # the noise std is the median of this many evenly spread slices' estimates
# Slices whose SURE decides the share: each costs two filter runs, so a stack of more slices takes the
# median share of this many evenly spread ones and runs the filter once on the rest (none where the
# share is 0): a 30-slice stack costs 33 filter runs, not 60.
SURE_SLICES = 3


@dataclass
class Blended:
    """The blend and what decided it."""

    image: np.ndarray  # float32 (Z, Y, X)
    weights: list[float]  # per slice: the classical filter's share
    sigma: float  # the estimated noise std, in image units


def _spread(depth: int, most: int) -> list[int]:
    """Up to ``most`` evenly spread slice indices of ``depth`` slices, first and last included."""
    return np.unique(np.linspace(0, depth - 1, min(most, depth)).round().astype(int)).tolist()


def stack_sigma(stack: np.ndarray) -> float:
    """The noise std of a (Z, Y, X) stack: the median over up to 8 evenly spread slices."""
    return float(np.median([estimate_sigma(stack[z]) for z in _spread(stack.shape[0], _SIGMA_SLICES)]))


def sure_weight(y: np.ndarray, f_n: np.ndarray, f_c: np.ndarray, div_n: float, div_c: float, var: float) -> float:
    """The share ``a`` in [0, 1] of ``f_c`` minimising SURE of ``f_n + a (f_c - f_n)``."""
    r = (y - f_n).astype(np.float64)
    d = (f_c - f_n).astype(np.float64)
    dd = float(np.sum(d * d))
    if dd <= 0.0:
        return 0.0
    return float(np.clip((float(np.sum(r * d)) - var * (div_c - div_n)) / dd, 0.0, 1.0))


def blend_with_collab(
    stack: np.ndarray, network: np.ndarray, network_fn: Callable[[np.ndarray], np.ndarray], seed: int = 0,
    slicewise: bool = False,
) -> Blended:
    """The network's denoising of a (Z, Y, X) stack blended per slice with collaborative filtering.

    SURE decides the filter's share on up to ``SURE_SLICES`` evenly spread slices; the others take
    their median share.

    Args:
        stack: the noisy (Z, Y, X) stack, image units.
        network: the network's estimate of it (posterior step included where it runs), image units.
        network_fn: the same estimate of another (Z, Y, X) stack (the same model and noise level),
            for the Monte-Carlo divergence.
        seed: of the perturbation.
        slicewise: the network denoises each slice on its own (a 2D plan): the perturbed copy then goes
            through it for the scored slices only, not the whole stack.

    Returns:
        The blend, float32, with each slice's classical share (a scored slice's own, the others' the
        median of those) and the noise std used.
    """
    stack = np.asarray(stack, np.float32)
    sigma = stack_sigma(stack)
    if sigma <= 0.0 or min(stack.shape[-2:]) < PATCH:
        return Blended(network.astype(np.float32), [0.0] * stack.shape[0], sigma)
    eps = EPS_SHARE * sigma
    probe = np.random.default_rng((seed, PROBE_STREAM)).standard_normal(stack.shape).astype(np.float32)
    depth = stack.shape[0]
    scored = _spread(depth, SURE_SLICES)
    if slicewise:
        network_probed = dict(zip(scored, network_fn(stack[scored] + eps * probe[scored])))
    else:  # a volume's network sees every slice: the whole perturbed stack goes through it
        network_probed = network_fn(stack + eps * probe)
    filtered, weights = {}, {}
    for z in scored:
        y, b = stack[z], probe[z]
        filtered[z] = collab_filter(y, sigma)
        f_c_probed = collab_filter(y + eps * b, sigma)
        div_c = float(np.sum(b * (f_c_probed - filtered[z]), dtype=np.float64)) / eps
        div_n = float(np.sum(b * (network_probed[z] - network[z]), dtype=np.float64)) / eps
        weights[z] = sure_weight(y, network[z], filtered[z], div_n, div_c, sigma * sigma)
    shared = float(np.median(list(weights.values())))
    out = np.empty(stack.shape, np.float32)
    for z in range(depth):
        a = weights.get(z, shared)
        if a <= 0.0:
            out[z] = network[z]
            continue
        f_c = filtered[z] if z in filtered else collab_filter(stack[z], sigma)
        out[z] = network[z] + a * (f_c - network[z])
    return Blended(out, [weights.get(z, shared) for z in range(depth)], sigma)
