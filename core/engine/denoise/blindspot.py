"""Noise2Void blind-spot masking: hide a sparse grid of pixels from the network and score only those.

A pixel's noise is independent of its neighbours' while its signal is not, so a network that
must predict a pixel from its surroundings alone learns the signal. Training shows it a patch
in which a few pixels are replaced by a random neighbour and asks for their original (noisy)
values; the loss is computed on those pixels only.

The masked pixels are drawn one per grid cell, and within a cell only from its first
``cell - radius`` positions, so two masked pixels are always more than ``radius`` apart. That
guarantees the blind spot: no masked pixel can be the replacement source of another, so a
masked pixel's own value appears nowhere in the network input. (With independent random
positions a few percent of masked pixels would see their own value next door and the
network would partly learn the identity.)
"""

from __future__ import annotations

import math

import torch


def mask_density(cell: int, dims: int = 2) -> float:
    """Share of pixels masked by a grid of ``cell``-sized cells (one pixel per cell)."""
    return 1.0 / cell**dims


def cell_for_density(density: float, radius: int, dims: int = 2) -> int:
    """The grid cell whose one-pixel-per-cell density is closest to ``density``.

    Args:
        density: wanted share of masked pixels, e.g. 0.02.
        radius: neighbourhood radius; a cell is at least ``radius + 2`` wide so there is
            positional freedom left within it.
        dims: spatial dimensions.

    Returns:
        The cell edge in pixels.
    """
    cell = round(density ** (-1.0 / dims))
    return max(int(cell), radius + 2)


def _neighbour_offsets(n: torch.Tensor, radius: int, dims: int) -> torch.Tensor:
    """Decode indices in [0, (2r+1)**dims - 1) into non-zero offsets of the (2r+1)**dims window."""
    k = 2 * radius + 1
    idx = n + (n >= (k**dims) // 2).to(n.dtype)  # skip the centre: a pixel never replaces itself
    digits = []
    for _ in range(dims):
        digits.append(idx % k)
        idx = idx // k
    return torch.stack(digits[::-1], dim=-1) - radius


def blindspot_batch(
    x: torch.Tensor, cell: int, radius: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch for Noise2Void training.

    Args:
        x: (B, C, *spatial) noisy patches, 2 or 3 spatial dims, on the CPU.
        cell: grid cell edge; one pixel per cell is masked (density 1 / cell**dims).
        radius: replacement values come from a random other pixel within this Chebyshev
            distance (the (2r+1)**dims window minus its centre). Must satisfy cell > radius + 1.
        gen: generator for every random draw (seeded by the caller for determinism).

    Returns:
        (network input, mask): the input is ``x`` with every masked pixel replaced by a
        neighbour's original value (all channels alike); the mask is (B, 1, *spatial) float
        with 1 at masked pixels. The training target is ``x`` itself.
    """
    if cell <= radius + 1:
        raise ValueError(f"blind-spot cell {cell} must exceed radius + 1 = {radius + 1}; use a larger cell")
    b, c, *size = x.shape
    dims = len(size)
    if any(s <= 2 * radius for s in size):
        raise ValueError(f"patch {tuple(size)} is too small for blind-spot radius {radius}; use larger patches")
    shape = torch.tensor(size)
    counts = [math.ceil(s / cell) for s in size]
    axes = torch.meshgrid(*[torch.arange(n) * cell for n in counts], indexing="ij")
    origin = torch.stack([a.reshape(-1) for a in axes], dim=-1)  # (P, dims) cell corners
    p = origin.shape[0]
    pos = origin[None] + torch.randint(0, cell - radius, (b, p, dims), generator=gen)
    valid = (pos < shape).all(-1)  # cells cut by the patch edge may fall outside
    off = _neighbour_offsets(torch.randint(0, (2 * radius + 1) ** dims - 1, (b, p), generator=gen), radius, dims)
    src = pos + off
    # Mirror the offset (not the coordinate) at the patch edge: it stays non-zero and within
    # the radius, so the source is never the pixel itself. Mirroring the coordinate could
    # land back on it (y=1, dy=-2 -> -1 -> 1).
    outside = (src < 0) | (src >= shape)
    src = torch.where(outside, pos - off, src)

    strides = torch.tensor([math.prod(size[i + 1 :]) for i in range(dims)])
    lin_pos = (pos * strides).sum(-1)[valid]
    lin_src = (src * strides).sum(-1)[valid]
    batch_idx = torch.arange(b)[:, None].expand(b, p)[valid]

    flat = x.reshape(b, c, -1).transpose(1, 2)  # (B, N, C)
    flat_in = flat.clone()
    flat_in[batch_idx, lin_pos] = flat[batch_idx, lin_src]  # gathered from the original, unmasked x
    mask = torch.zeros(b, flat.shape[1], dtype=x.dtype)
    mask[batch_idx, lin_pos] = 1
    x_in = flat_in.transpose(1, 2).reshape(x.shape).contiguous()
    return x_in, mask.reshape(b, 1, *size)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels whose weight is non-zero.

    ``torch.where`` (not a multiplication) selects them, so an unscored pixel contributes
    exactly zero gradient even where the prediction is inf or NaN.

    Args:
        pred: (B, C, *spatial) network output.
        target: same shape.
        weight: (B, 1, *spatial), 1 where scored (Noise2Void: masked pixels; otherwise all).

    Returns:
        Scalar loss; 0 when no pixel is scored.
    """
    pred = pred.float()
    diff = torch.where(weight > 0, pred - target.float(), torch.zeros((), device=pred.device))
    sq = diff * diff * weight
    return sq.sum() / (weight.sum() * pred.shape[1]).clamp(min=1.0)
