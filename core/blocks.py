"""Blockwise planning for large volumes: blocks on the zarr chunk grid, each read with a halo (pure)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

Region = tuple[tuple[int, int], ...]  # [start, stop) per axis


@dataclass(frozen=True)
class Block:
    """One unit of blockwise work: write ``core``, computed from ``read`` (core plus halo, clipped)."""

    index: int
    core: tuple[tuple[int, int], ...]  # [start, stop) per axis, written to the output
    read: tuple[tuple[int, int], ...]  # [start, stop) per axis, read from the input

    def core_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.core)

    def read_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.read)

    def crop(self) -> tuple[slice, ...]:
        """Where the core lies inside the read region."""
        return tuple(slice(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(self.core, self.read))

    @property
    def voxels(self) -> int:
        return math.prod(b - a for a, b in self.core)


def block_shape(shape: tuple[int, ...], chunks: tuple[int, ...], target_voxels: int) -> tuple[int, ...]:
    """A block shape made of whole chunks, near ``target_voxels``, growing the in-plane axes first.

    Whole chunks keep every block's writes disjoint at the storage level, so blocks written
    concurrently never touch the same chunk object.
    """
    size = list(chunks)
    order = list(range(len(shape)))[::-1]  # X, then Y, then Z...
    grown = True
    while grown and math.prod(size) < target_voxels:
        grown = False
        for ax in order:
            if size[ax] < shape[ax] and math.prod(size) * 2 <= target_voxels * 1.5:
                size[ax] = min(shape[ax], size[ax] + chunks[ax] * max(1, size[ax] // chunks[ax]))
                grown = True
    return tuple(min(s, n) for s, n in zip(size, shape))


def plan_blocks(shape: tuple[int, ...], chunks: tuple[int, ...], halo: tuple[int, ...],
                target_voxels: int, reach: Callable[[Region], Region] | None = None) -> list[Block]:
    """Cut a volume into chunk-aligned blocks with halos.

    Args:
        shape: the volume's shape.
        chunks: its zarr chunk shape (blocks are whole multiples of it).
        halo: context each block reads beyond its core, per axis (the model's receptive need).
        target_voxels: wanted core size, chosen so that a block takes seconds (amortises dispatch).
        reach: what a core must read, instead of a fixed halo (e.g. ``WindowGrid.read_region``:
            exactly the whole volume's prediction windows that touch the core).
    """
    if not (len(shape) == len(chunks) == len(halo)):
        raise ValueError(f"shape {shape}, chunks {chunks} and halo {halo} differ in length")
    size = block_shape(tuple(shape), tuple(chunks), target_voxels)
    ranges = [range(0, n, s) for n, s in zip(shape, size)]
    blocks = []
    for i, starts in enumerate(itertools.product(*ranges)):
        core = tuple((s, min(s + b, n)) for s, b, n in zip(starts, size, shape))
        read = tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(core, halo, shape))
        if reach is not None:
            read = reach(core)
        blocks.append(Block(i, core, read))
    return blocks


# Largest output chunk: big enough that a block is written as one or a few objects, small enough
# for viewers (napari, Fiji) that load chunk by chunk.
OUTPUT_CHUNK_BYTES = 4 * 2**20


def output_chunks(block: tuple[int, ...], chunks: tuple[int, ...], itemsize: int,
                  limit: int = OUTPUT_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunks of the output volume: a whole block per chunk, halved (outer axes first) while over ``limit``.

    The input's chunks are the user's, often small (64 KiB); writing a 1 MiB block as sixteen
    objects cost 8.6 ms where one cost 2.5 ms (zarr's per-chunk work, and one request per object
    on S3). Any chunk dividing the block keeps writes disjoint: a block shape is the input chunk
    times a power of two along every axis it cuts, or the whole axis (one block along it).

    Args:
        block: the block shape from ``block_shape``.
        chunks: the input's chunk shape, the smallest the output gets.
        itemsize: bytes per output voxel.
        limit: bytes per chunk aimed under.
    """
    out = list(block)
    for ax in range(len(out)):  # Z first: a viewer showing one plane reads fewer planes' worth
        while math.prod(out) * itemsize > limit and out[ax] > chunks[ax] and out[ax] % 2 == 0:
            out[ax] = max(chunks[ax], out[ax] // 2)
    return tuple(out)


def choose_block_voxels(voxels_per_s: float, memory_bytes: int, bytes_per_voxel: float,
                        seconds: float = 3.0, floor: int = 2**18, ceiling: int = 2**26) -> int:
    """Core voxels per block: about ``seconds`` of compute, within an eighth of the node's memory.

    A block must take long enough that the queue's per-block cost (milliseconds) is negligible,
    and short enough that many nodes share a volume and a lost block costs little to redo.

    Args:
        voxels_per_s: measured throughput of the model on this node.
        memory_bytes: the node's memory.
        bytes_per_voxel: working memory per core voxel (input, halo, class probabilities, blending).
    """
    want = voxels_per_s * seconds
    cap = memory_bytes / 8 / max(bytes_per_voxel, 1.0)
    return int(max(floor, min(want, cap, ceiling)))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Starts of the prediction windows along one axis: a stride of ``roi * (1 - overlap)``, the last flush."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = -(-(size - roi) // step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


@dataclass(frozen=True)
class WindowGrid:
    """The sliding windows of one whole volume, along the axes a network sees (the last ``len(roi)``).

    Anchored to the volume, not to the part of it at hand: a block predicted on its own runs the
    very windows the whole-volume pass runs over its core, and blends them with the same weights in
    the same order, so blockwise output equals single-pass output (``core/engine/tiling.py``).
    """

    shape: tuple[int, ...]  # the whole volume's extent along the windowed axes
    roi: tuple[int, ...]  # window size; may exceed a short axis, which is then padded
    overlap: float

    def starts(self, axis: int) -> list[int]:
        return window_starts(self.shape[axis], self.roi[axis], self.overlap)

    def extent(self, axis: int, start: int) -> tuple[int, int]:
        """Where a window lies in the volume (clipped: a window longer than its axis is padded)."""
        return start, min(start + self.roi[axis], self.shape[axis])

    def span(self, axis: int, a: int, b: int) -> tuple[int, int]:
        """The input a core ``[a, b)`` needs along ``axis``: the union of the windows that touch it."""
        touching = [self.extent(axis, s) for s in self.starts(axis) if s < b and s + self.roi[axis] > a]
        return min(lo for lo, _ in touching), max(hi for _, hi in touching)

    def inside(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Starts of the windows lying wholly in the region ``[lo, hi)``, in the whole pass's order."""
        per_axis = [[s for s in self.starts(ax) if s >= lo[ax] and self.extent(ax, s)[1] <= hi[ax]]
                    for ax in range(len(self.shape))]
        return list(itertools.product(*per_axis))

    def read_region(self, core: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        """Read region of a block core of a volume whose last axes are this grid's (others: the core)."""
        lead = len(core) - len(self.shape)
        return tuple(core[:lead]) + tuple(self.span(ax, a, b) for ax, (a, b) in enumerate(core[lead:]))
