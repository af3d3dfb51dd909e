"""Patch sampling: class-balanced training batches centred on painted pixels, fixed validation tiles.

MONAI's RandCropByLabelClasses draws one sample at a time through the transform pipeline;
here a whole batch is cut with NumPy slicing from a once-padded volume, which is what keeps
a 2-core CPU busy with the network instead of with data handling. Every batch is drawn from
a generator seeded by (seed, epoch, batch index), so a run resumed at epoch k sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# Above this many painted pixels per class, a seeded subsample of centres is kept: as good
# for sampling and it bounds memory on densely labelled volumes.
_MAX_CENTRES_PER_CLASS = 1_000_000
# Cap on validation tiles so validation stays a small fraction of an epoch: 256 tiles of a 2D
# patch, and for bigger (3D) tiles as many as hold the same number of voxels as 256 tiles of
# 256x256 (a 64^3 tile counts 64^3 voxels: 64 of them, not 256).
MAX_VAL_TILES = 256
MAX_VAL_VOXELS = 256 * 256 * 256


def max_val_tiles(patch: tuple[int, ...] | list[int]) -> int:
    """How many validation tiles of this patch size are kept at most."""
    return int(max(1, min(MAX_VAL_TILES, MAX_VAL_VOXELS // max(1, int(np.prod(patch))))))


def _cell_size(patch: tuple[int, ...]) -> tuple[int, int, int]:
    """Validation cell of the (Z, Y, X) axes: half a patch, one slice deep for a 2D patch."""
    full = (1,) * (3 - len(patch)) + tuple(int(p) for p in patch)
    return tuple(max(1, p // 2) if p > 1 else 1 for p in full)


def val_cells(val_labels: np.ndarray, patch: tuple[int, ...] | list[int]) -> list[tuple[int, ...]]:
    """The cells (grid indices, sorted) holding held-back labels: one validation tile each."""
    cell = _cell_size(tuple(patch))
    return sorted(set(zip(*((i // c).tolist() for i, c in zip(np.nonzero(val_labels), cell)))))


def _pad_widths(patch: tuple[int, ...]) -> tuple[int, int, int]:
    """Padding of the (Z, Y, X) axes: half a patch for the crop plus a quarter for the centre
    jitter; none along Z for 2D patches, which take one slice."""
    full = (1,) * (3 - len(patch)) + tuple(patch)
    return tuple(0 if p == 1 else p // 2 + p // 4 + 1 for p in full)


def _pad(volume: np.ndarray, pads: tuple[int, ...], mode: str) -> np.ndarray:
    widths = [(p, p) for p in pads]
    if mode == "constant":
        return np.pad(volume, widths, mode="constant")
    return np.pad(volume, widths, mode="symmetric")


class TrainPatches(Dataset):
    """One item = one training batch of 2D or 3D patches, centred near painted pixels of a random class.

    Classes are drawn in equal shares per batch, so a rare class is seen as often as a common one.
    """

    def __init__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        patch: tuple[int, int],
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        num_classes: int | None = None,
    ) -> None:
        """Build the sampler.

        Args:
            image: (Z, Y, X) normalised float32 image.
            labels: (Z, Y, X) uint8 training labels, 0 = unlabelled.
            patch: (py, px) 2D patch, or (pz, py, px) for a 3D network.
            batch_size: patches per batch.
            steps_per_epoch: batches per epoch (the dataset length).
            seed: base seed.
            num_classes: K where labels above K stand for class ``label - K`` (accepted labels,
                ``encode_accepted``): those are drawn as their class. None: every value is its own class.
        """
        self.patch = tuple(int(p) for p in patch)
        self.pads = _pad_widths(self.patch)
        self.image = _pad(image.astype(np.float32, copy=False), self.pads, "symmetric")
        self.labels = _pad(labels.astype(np.uint8, copy=False), self.pads, "constant")
        self.shape = labels.shape
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.epoch = 0
        rng = np.random.default_rng([seed, 7919])
        self.centres: list[np.ndarray] = []
        groups: dict[int, list[int]] = {}
        for c in np.unique(labels):
            if c == 0:
                continue
            groups.setdefault(int(c - 1) % num_classes + 1 if num_classes else int(c), []).append(int(c))
        for _, values in sorted(groups.items()):
            idx = np.flatnonzero(labels == values[0]) if len(values) == 1 else np.flatnonzero(np.isin(labels, values))
            if len(idx) > _MAX_CENTRES_PER_CLASS:
                idx = rng.choice(idx, _MAX_CENTRES_PER_CLASS, replace=False)
            self.centres.append(idx)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = len(self.centres)
        classes = rng.permutation(np.resize(np.arange(k), self.batch_size))
        py, px = self.patch[-2:]
        pz = self.patch[0] if len(self.patch) == 3 else 1
        xs = np.empty((self.batch_size, 1, *self.patch), dtype=np.float32)
        ys = np.empty((self.batch_size, 1, *self.patch), dtype=np.uint8)
        for i, c in enumerate(classes):
            flat = self.centres[c][rng.integers(len(self.centres[c]))]
            z, y, x = np.unravel_index(flat, self.shape)
            # Jitter keeps the painted pixel off the exact centre so the border context varies.
            y0 = y + self.pads[1] - py // 2 + rng.integers(-(py // 4), py // 4 + 1)
            x0 = x + self.pads[2] - px // 2 + rng.integers(-(px // 4), px // 4 + 1)
            z0 = z + self.pads[0] - pz // 2 + (rng.integers(-(pz // 4), pz // 4 + 1) if pz > 1 else 0)
            window = (slice(z0, z0 + pz), slice(y0, y0 + py), slice(x0, x0 + px))
            xs[i, 0] = self.image[window].reshape(self.patch)
            ys[i, 0] = self.labels[window].reshape(self.patch)
        return torch.from_numpy(xs), torch.from_numpy(ys)


class ValTiles(Dataset):
    """Fixed validation batches: tiles around the held-back strokes, each pixel scored once.

    The slices are cut into cells of half a patch; every cell holding a validation pixel
    becomes a patch-sized tile centred on it whose labels are kept only inside the cell, so each
    scored pixel has at least a quarter patch of context and none is counted twice.
    """

    def __init__(self, image: np.ndarray, val_labels: np.ndarray, patch: tuple[int, ...], batch_size: int, seed: int):
        """Build the tiles.

        Args:
            image: (Z, Y, X) normalised float32 image.
            val_labels: (Z, Y, X) uint8 held-back labels, 0 elsewhere.
            patch: (py, px) tile size, or (pz, py, px) for a 3D network (cells are then 3D too).
            batch_size: tiles per batch.
            seed: seed of the subsample taken when there are too many tiles.
        """
        shape = tuple(int(p) for p in patch)
        full = (1,) * (3 - len(shape)) + shape  # a 2D tile is one slice deep
        cell = _cell_size(shape)
        pads = _pad_widths(shape)
        image_p = _pad(image.astype(np.float32, copy=False), pads, "symmetric")
        cells = val_cells(val_labels, shape)
        cap = max_val_tiles(shape)
        if len(cells) > cap:
            keep = np.random.default_rng(seed).choice(len(cells), cap, replace=False)
            cells = [cells[i] for i in sorted(keep)]
        self.x = np.zeros((len(cells), 1, *shape), dtype=np.float32)
        self.y = np.zeros((len(cells), 1, *shape), dtype=np.uint8)
        offset = tuple((p - c) // 2 for p, c in zip(full, cell))
        for i, g in enumerate(cells):
            start = [gi * c - o for gi, c, o in zip(g, cell, offset)]
            window = tuple(slice(a + pad, a + pad + p) for a, pad, p in zip(start, pads, full))
            self.x[i, 0] = image_p[window].reshape(shape)
            own = val_labels[tuple(slice(gi * c, (gi + 1) * c) for gi, c in zip(g, cell))]
            tile = np.zeros(full, dtype=np.uint8)
            tile[tuple(slice(o, o + n) for o, n in zip(offset, own.shape))] = own
            self.y[i, 0] = tile.reshape(shape)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return torch.from_numpy(self.x[s]), torch.from_numpy(self.y[s])
