"""Denoising data: held-out validation region, seeded training batches with flips/rotations, val tiles.

Batches are cut with NumPy in the training process (no DataLoader workers): on a small CPU the
workers would only compete with the network for cores. Every training batch is a function of
(seed, epoch, batch index), so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from dlorch.core.engine.denoise.blindspot import blindspot_batch

# Validation is a forward pass per epoch; this many tiles keep it a small share of the epoch.
MAX_VAL_TILES = 16
VAL_SLICE_SHARE = 0.1  # share of slices held out when the stack has enough of them
VAL_ROW_SHARE = 0.15  # share of rows held out of every slice otherwise
MIN_SLICES_FOR_SLICE_HOLDOUT = 5
GRID = 16  # patches and held-out bands are multiples of this, which every planned U-Net divides


def choose_holdout(shape: tuple[int, int, int]) -> tuple[list[int], int]:
    """Which data validation holds back: whole slices of a stack, else a band of rows.

    Args:
        shape: (Z, Y, X) of the stack.

    Returns:
        (held-out slice indices, held-out rows at the bottom of every slice); both empty/0 when
        the image is too small to spare anything (then the latest weights count as best).
    """
    z, y, _ = shape
    if z >= MIN_SLICES_FOR_SLICE_HOLDOUT:
        n = max(1, round(VAL_SLICE_SHARE * z))
        # Evenly spread, away from the ends, so validation sees the middle of the stack too.
        picks = np.linspace(0, z - 1, n + 2)[1:-1].round().astype(int)
        return sorted(set(picks.tolist())), 0
    rows = GRID * math.ceil(max(GRID, VAL_ROW_SHARE * y) / GRID)
    if y - rows < GRID:
        return [], 0
    return [], rows


def split_holdout(stack: np.ndarray, val_slices: list[int], val_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Cut a (Z, Y, X) stack into its training part and its held-out part (None if nothing is held out)."""
    if val_slices:
        keep = np.setdiff1d(np.arange(stack.shape[0]), val_slices)
        return stack[keep], stack[val_slices]
    if val_rows:
        return stack[:, : stack.shape[1] - val_rows], stack[:, stack.shape[1] - val_rows :]
    return stack, None


def pad_to(stack: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Mirror-pad the last ``len(size)`` axes of a (Z, Y, X) stack up to at least ``size`` (a no-op when large enough)."""
    pads = [(0, 0)] * (3 - len(size)) + [(0, max(0, s - d)) for s, d in zip(size, stack.shape[-len(size):])]
    return stack if not any(p for _, p in pads) else np.pad(stack, pads, mode="symmetric")


def dihedral(patch: np.ndarray, quarter_turns: int, flip: bool) -> np.ndarray:
    """One of the 8 flips/90° rotations of a patch in its last two axes (in-plane for a 3D patch)."""
    out = patch[..., ::-1] if flip else patch
    return np.rot90(out, quarter_turns, axes=(-2, -1))


def make_batch(
    inputs: np.ndarray, targets: np.ndarray | None, n2v: tuple[int, int] | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn (B, H, W) input/target patches into a training triple.

    Args:
        inputs: (B, H, W) network inputs.
        targets: (B, H, W) targets, or None for Noise2Void (the input is its own target).
        n2v: (cell, radius) of the blind-spot mask for Noise2Void, else None.
        gen: generator of the mask draws.

    Returns:
        (x, y, weight), each (B, 1, H, W) float32: network input, target, 1 where the loss is scored.
    """
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[:, None]
    if n2v is not None:
        x_in, weight = blindspot_batch(x, n2v[0], n2v[1], gen)
        return x_in, x, weight
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))[:, None]
    return x, y, torch.ones_like(y)


class TrainBatches(Dataset):
    """``steps`` random batches per epoch, each seeded by (seed, epoch, index); set ``epoch`` before each epoch."""

    def __init__(
        self,
        inputs: np.ndarray,
        targets: np.ndarray | None,
        patch: tuple[int, int],
        batch: int,
        steps: int,
        seed: int,
        n2v: tuple[int, int] | None = None,
        swap: bool = False,
    ) -> None:
        """Args:
        inputs: (Z, Y, X) normalised training region.
        targets: same shape, or None for Noise2Void.
        patch: (H, W) patch size.
        batch: patches per batch.
        steps: batches per epoch.
        seed: base seed.
        n2v: (cell, radius) for Noise2Void masking, else None.
        swap: let input and target trade places at random (Noise2Noise: both are noisy).
        """
        self.inputs = pad_to(inputs, patch)
        self.targets = None if targets is None else pad_to(targets, patch)
        self.patch, self.batch, self.steps, self.seed = tuple(patch), batch, steps, seed
        self.n2v, self.swap = n2v, swap
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.steps:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        h, w = self.patch[-2:]
        d = self.patch[0] if len(self.patch) == 3 else 1
        z, ys, xs = self.inputs.shape
        zi = rng.integers(0, z - d + 1, self.batch)
        yi = rng.integers(0, ys - h + 1, self.batch)
        xi = rng.integers(0, xs - w + 1, self.batch)
        # 90° turns of a non-square patch would change its shape; those get flips only.
        turns = rng.integers(0, 4, self.batch) if h == w else np.zeros(self.batch, int)
        flips = rng.integers(0, 2, self.batch).astype(bool)
        swaps = rng.integers(0, 2, self.batch).astype(bool) if self.swap else np.zeros(self.batch, bool)
        deep = rng.integers(0, 2, self.batch).astype(bool) if d > 1 else np.zeros(self.batch, bool)
        ins, tgts = [], []
        for k in range(self.batch):
            # A 2D patch is one slice (an integer index drops the axis); a 3D one a slab, also flipped along Z.
            zs = slice(zi[k], zi[k] + d) if d > 1 else zi[k]
            window = (zs, slice(yi[k], yi[k] + h), slice(xi[k], xi[k] + w))
            a = dihedral(self.inputs[window], turns[k], flips[k])
            a = a[::-1] if deep[k] else a
            if self.targets is not None:
                b = dihedral(self.targets[window], turns[k], flips[k])
                b = b[::-1] if deep[k] else b
                a, b = (b, a) if swaps[k] else (a, b)
                tgts.append(b)
            ins.append(a)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return make_batch(np.stack(ins), np.stack(tgts) if tgts else None, self.n2v, gen)


class ValTiles(Dataset):
    """Fixed validation batches from the held-out region (same tiles and masks every epoch).

    Fixed masks matter for Noise2Void: the validation loss then compares epochs on the very
    same pixels, so its differences reflect the model rather than the draw.
    """

    def __init__(
        self,
        inputs: np.ndarray | None,
        targets: np.ndarray | None,
        patch: tuple[int, int],
        batch: int,
        seed: int,
        n2v: tuple[int, int] | None = None,
    ) -> None:
        """Args:
        inputs: (Z, Y, X) normalised held-out region, or None for no validation.
        targets: same shape, or None for Noise2Void.
        patch: training patch size; tiles are at most this large.
        batch: tiles per batch.
        seed: seed of the tile choice and masks.
        n2v: (cell, radius) for Noise2Void masking, else None.
        """
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if inputs is None:
            return
        z, ys, xs = inputs.shape
        full = (1,) * (3 - len(patch)) + tuple(patch)  # a 2D tile is one slice deep
        tile = tuple(p if p == 1 else min(p, max(GRID, GRID * (n // GRID))) for p, n in zip(full, (z, ys, xs)))
        shape = tile[-len(patch):]
        inputs = pad_to(inputs, shape)
        targets = None if targets is None else pad_to(targets, shape)
        corners = [
            (k, y, x)
            for k in range(0, max(1, inputs.shape[0] - tile[0] + 1), tile[0])
            for y in range(0, max(1, inputs.shape[1] - tile[1] + 1), tile[1])
            for x in range(0, max(1, inputs.shape[2] - tile[2] + 1), tile[2])
        ]
        pick = np.linspace(0, len(corners) - 1, min(MAX_VAL_TILES, len(corners))).round().astype(int)
        chosen = [corners[i] for i in sorted(set(pick.tolist()))]
        gen = torch.Generator().manual_seed(seed + 7919)
        for start in range(0, len(chosen), batch):
            part = chosen[start : start + batch]
            windows = [(slice(k, k + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2])) for k, y, x in part]
            ins = np.stack([inputs[w].reshape(shape) for w in windows])
            tgts = None if targets is None else np.stack([targets[w].reshape(shape) for w in windows])
            self.batches.append(make_batch(ins, tgts, n2v, gen))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.batches[index]
