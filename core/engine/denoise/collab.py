"""Collaborative filtering of a 2D image with a known Gaussian noise level: BM3D's published algorithm.

Dabov et al. 2007, "Image denoising by sparse 3D transform-domain collaborative filtering", as
analysed by Lebrun 2012 (IPOL, "An analysis and implementation of the BM3D image denoising
method"). Two passes over reference patches on a stride-3 grid:

1. Block matching on the noisy image (8x8 patches, a 39x39 search window as in the reference
   implementation, where 33x33 lost 0.02-0.06 dB; up to 16 matches within a distance threshold, of
   which a group keeps the largest power of two); the group goes through a 2D biorthogonal 1.5
   wavelet transform per patch (Dabov et al.'s choice; the DCT lost 0.08 dB on the photographs) and
   a Haar transform across patches, coefficients below 2.7 sigma (times the wavelet's row norms) are
   zeroed, and the patches come back weighted by 1 / (kept coefficients) and a Kaiser window into a
   basic estimate.
2. Block matching again on the basic estimate (up to 32 matches); in the 2D DCT the noisy group is
   shrunk by the empirical Wiener coefficients |B|^2 / (|B|^2 + sigma^2) of the basic estimate's group.

Written here in torch (vectorised over all reference patches) because no dependency of dlorch
provides it: the reference ``bm3d`` package is closed and under a non-commercial licence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 8  # patch side, both passes (Lebrun's for sigma <= 40; larger noise gains little from 11-12)
STRIDE = 3  # reference-patch grid
SEARCH = 19  # half-side of the search window: 39 x 39 candidate positions, as the reference BM3D
GROUP_HARD, GROUP_WIENER = 16, 32  # most patches per group, pass 1 and 2
LAMBDA_HARD = 2.7  # hard threshold, in noise stds
KAISER_BETA = 2.0
# Matching thresholds on the mean squared patch difference, in noise variances: two patches of the
# same clean content differ by 2 sigma^2 in pass 1 (noisy against noisy); Lebrun's 2500 and 400
# (0-255 scale) at sigma 25 are 4 and 0.64 sigma^2.
TAU_HARD, TAU_WIENER = 4.0, 0.64
STAGE1 = "bior1.5"  # the first pass's patch transform ("dct": the second pass's, as before)
_CHUNK = 4096  # reference patches per batch of the transform step (memory ~ chunk x 32 x 64 floats)
_BAND = 8  # reference rows per block-matching band


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are the basis functions)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


def _bior15() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8-point biorthogonal 1.5 wavelet transform of BM3D's first pass: (forward, inverse, row norms).

    Three levels with periodic extension, as ``pywt.wavedec(x, "bior1.5", mode="periodization", level=3)``
    computes it (rows: the mean, the level-3 detail, the two level-2 details, the four level-1 ones).
    Not orthogonal: a coefficient's noise std is sigma times its row's norm (1 to 1.06).
    """
    r2 = math.sqrt(2.0)
    rows = [[1.0] * 8, [v / 32 for v in (21, 43, 43, 21, -21, -43, -43, -21)]]
    fwd = torch.tensor(rows, dtype=torch.float64) / (2 * r2)
    level2 = torch.tensor([[75, 53, -53, -75, -11, 11, -11, 11], [-11, 11, -11, 11, 75, 53, -53, -75]],
                          dtype=torch.float64) / 128
    level1 = torch.kron(torch.eye(4, dtype=torch.float64), torch.tensor([[1.0, -1.0]], dtype=torch.float64)) / r2
    fwd = torch.cat([fwd, level2, level1])
    return fwd.float(), torch.linalg.inv(fwd).float(), torch.linalg.norm(fwd, dim=1).float()


def _haar(n: int) -> torch.Tensor:
    """Orthonormal Haar wavelet matrix of a power-of-two size (rows: the mean, then details coarse to fine)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        m = h.shape[0]
        h = torch.cat([torch.kron(h, torch.ones(1, 2)), torch.kron(torch.eye(m), torch.tensor([[1.0, -1.0]]))], 0)
        h = h / torch.linalg.norm(h, dim=1, keepdim=True)
    return h


def _grid(extent: int) -> torch.Tensor:
    """Reference positions along one axis: every STRIDE-th, and the last one so the border is covered."""
    pos = list(range(0, extent - PATCH + 1, STRIDE))
    if pos[-1] != extent - PATCH:
        pos.append(extent - PATCH)
    return torch.tensor(pos)


def block_match(image: torch.Tensor, most: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``most`` patches closest to each reference patch within the search window.

    Args:
        image: (H, W) float32, H and W >= PATCH.
        most: group size cap (a power of two).
        tau: distance threshold (mean squared difference per pixel).

    Returns:
        (indices (R, most) into the (H-PATCH+1) * (W-PATCH+1) flat patch positions, the reference
        first; group sizes (R,): the largest power of two of the matches within ``tau``).
    """
    h, w = image.shape
    ph, pw = h - PATCH + 1, w - PATCH + 1
    ry, rx = _grid(h), _grid(w)
    n = SEARCH
    padded = F.pad(image[None, None], (n, n, n, n), mode="replicate")[0, 0]
    dx = torch.arange(-n, n + 1)
    cx = rx[None, :] + dx[:, None]  # (2n+1, Rx) candidate columns
    x_out = (cx < 0) | (cx >= pw)
    # A running top-``most`` over the rows of the search window keeps memory at (R, most + 2n+1).
    best = torch.full((len(ry) * len(rx), most), math.inf)
    best_idx = torch.zeros((len(ry) * len(rx), most), dtype=torch.long)
    for dy in range(-n, n + 1):
        d = torch.cat([_band_distances(image, padded, dy, ry[j : j + _BAND], rx) for j in range(0, len(ry), _BAND)])
        cy = ry + dy
        d = d.masked_fill(x_out[None], math.inf).masked_fill(((cy < 0) | (cy >= ph))[:, None, None], math.inf)
        if dy == 0:
            d[:, n, :] = -1.0  # the reference itself comes first
        idx = (cy[:, None, None] * pw + cx[None]).permute(0, 2, 1).reshape(-1, 2 * n + 1)
        d = d.permute(0, 2, 1).reshape(-1, 2 * n + 1)
        best, which = torch.topk(torch.cat([best, d], 1), most, dim=1, largest=False, sorted=True)
        best_idx = torch.gather(torch.cat([best_idx, idx], 1), 1, which)
    count = (best <= tau).sum(1).clamp(min=1)
    size = 2 ** torch.floor(torch.log2(count.float())).long()
    return best_idx, size


def _band_distances(image: torch.Tensor, padded: torch.Tensor, dy: int, ry: torch.Tensor, rx: torch.Tensor
                    ) -> torch.Tensor:
    """Mean squared differences (len(ry), 2n+1, len(rx)) between the patches at (ry, rx) and those dy rows and
    -n..n columns away; one band of reference rows at a time, so that the (rows, 2n+1, W) arrays stay in cache."""
    n, w = SEARCH, image.shape[1]
    top, bottom = int(ry[0]), int(ry[-1]) + PATCH
    shifted = padded[n + dy + top : n + dy + bottom].unfold(1, w, 1)  # (rows, 2n+1, W): every dx of this dy
    sq = F.pad(((shifted - image[top:bottom, None]) ** 2).cumsum(0), (0, 0, 0, 0, 1, 0))  # running sums down
    rows = F.pad((sq[ry - top + PATCH] - sq[ry - top]).cumsum(2), (1, 0))  # 8-row sums, running along x
    return (rows[:, :, rx + PATCH] - rows[:, :, rx]) / (PATCH * PATCH)


def _filter_pass(
    noisy: torch.Tensor, guide: torch.Tensor | None, sigma: float, idx: torch.Tensor, size: torch.Tensor
) -> torch.Tensor:
    """One aggregation pass: hard thresholding (``guide`` None) or Wiener shrinkage guided by ``guide``."""
    h, w = noisy.shape
    ph, pw = h - PATCH + 1, w - PATCH + 1
    d = _dct_matrix(PATCH)
    # pass 1 in the bior1.5 wavelet (Dabov et al.'s choice, 0.1-0.2 dB above the DCT there), pass 2 in the DCT
    fwd, inv, norms = _bior15() if guide is None and STAGE1 == "bior1.5" else (d, d.T, torch.ones(PATCH))
    threshold = LAMBDA_HARD * sigma * torch.outer(norms, norms)  # each coefficient's noise std, times lambda
    cols = F.unfold(noisy[None, None], PATCH)[0].T.reshape(-1, PATCH, PATCH)  # (P, 8, 8) patches
    gcols = None if guide is None else F.unfold(guide[None, None], PATCH)[0].T.reshape(-1, PATCH, PATCH)
    kaiser = torch.from_numpy(np.outer(np.kaiser(PATCH, KAISER_BETA), np.kaiser(PATCH, KAISER_BETA))).float()
    num = torch.zeros(ph * pw, PATCH * PATCH)
    den = torch.zeros(ph * pw, PATCH * PATCH)
    var = sigma * sigma
    for s in sorted(set(size.tolist())):
        hs = _haar(s)
        refs = torch.nonzero(size == s)[:, 0]
        for c0 in range(0, len(refs), _CHUNK):
            sel = idx[refs[c0 : c0 + _CHUNK], :s]  # (r, s)
            spec = torch.einsum("ij,rjkl->rikl", hs, fwd @ cols[sel] @ fwd.T)  # (r, s, 8, 8)
            if gcols is None:
                keep = spec.abs() >= threshold
                spec = spec * keep
                weight = 1.0 / (var * keep.flatten(1).sum(1).clamp(min=1).float())
            else:
                basic = torch.einsum("ij,rjkl->rikl", hs, d @ gcols[sel] @ d.T)
                shrink = basic**2 / (basic**2 + var)
                spec = spec * shrink
                weight = 1.0 / (var * (shrink**2).flatten(1).sum(1).clamp(min=1e-12))
            patches = inv @ torch.einsum("ji,rjkl->rikl", hs, spec) @ inv.T  # the Haar across is orthonormal
            wk = (weight[:, None] * kaiser.reshape(1, -1))[:, None].expand(-1, s, -1)  # (r, s, 64)
            flat = sel.reshape(-1)
            num.index_add_(0, flat, patches.reshape(len(flat), -1) * wk.reshape(len(flat), -1))
            den.index_add_(0, flat, wk.reshape(len(flat), -1))
    fold = lambda c: F.fold(c.T[None], (h, w), PATCH)[0, 0]  # noqa: E731
    total = fold(den)
    return torch.where(total > 0, fold(num) / total.clamp(min=1e-30), noisy)


def _one_thread(fn, *args):
    """Run ``fn`` on one torch thread: block matching is many small operations, and splitting each over
    threads cost 6x its single-thread time on a 2-core machine busy with other work (3.5 s against 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def collab_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """Denoise one 2D image with Gaussian noise of std ``sigma`` (its units).

    Args:
        image: (H, W) float array, both sides >= PATCH.
        sigma: the noise std (> 0).

    Returns:
        float32 (H, W) estimate.
    """
    y = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    sigma = float(max(sigma, 1e-12))
    var = sigma * sigma
    with torch.no_grad():
        basic = _filter_pass(y, None, sigma, *_one_thread(block_match, y, GROUP_HARD, TAU_HARD * var))
        final = _filter_pass(y, basic, sigma, *_one_thread(block_match, basic, GROUP_WIENER, TAU_WIENER * var))
    return final.numpy()
