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


def block_shape(shape: tuple[int, ...], chunks: tuple[int, ...], target_voxels: int,
                reach: Callable[[Region], Region] | None = None) -> tuple[int, ...]:
    """A block shape made of whole chunks, up to 1.5x ``target_voxels``, that reads least beyond its core.

    Whole chunks keep every block's writes disjoint at the storage level, so blocks written
    concurrently never touch the same chunk object. Each axis is the chunk times a power of two,
    or the whole axis. Of those shapes near the target (half to 1.5 times it), the one whose blocks
    read the fewest voxels in all, per voxel written, wins; on a tie the larger. What a block reads is
    what it computes: a 2D network with 1024 px windows cut into blocks of half a slice ran both
    halves' windows twice (two slices per block, 0.55 s per Mvoxel against 0.26 s for a whole slice).

    Args:
        shape, chunks: the volume's shape and zarr chunk shape.
        target_voxels: wanted core voxels.
        reach: what a core must read (``plan_blocks``); None reads the core alone.
    """
    reach = reach or (lambda core: core)
    sizes = [_doublings(c, n) for n, c in zip(shape, chunks)]
    # Reading is separable per axis (windows and halos are), so the blocks' total read is the product
    # over axes of each axis's summed read lengths: an axis and a size are costed once.
    spread = [{s: _read_along(shape, ax, s, reach) / n for s in options}
              for ax, (n, options) in enumerate(zip(shape, sizes))]
    candidates = [(math.prod(c), c) for c in itertools.product(*sizes) if math.prod(c) <= 1.5 * target_voxels]
    if not candidates:
        return tuple(o[0] for o in sizes)
    near = [(v, c) for v, c in candidates if v >= target_voxels / 2] or [max(candidates)]
    return min(near, key=lambda vc: (round(math.prod(spread[ax][s] for ax, s in enumerate(vc[1])), 6), -vc[0]))[1]


def _doublings(chunk: int, n: int) -> list[int]:
    """The chunk, twice it, four times... up to the whole axis of length ``n``."""
    sizes = [min(chunk, n)]
    while sizes[-1] < n:
        sizes.append(min(sizes[-1] * 2, n))
    return sizes


def _read_along(shape: tuple[int, ...], axis: int, size: int, reach: Callable[[Region], Region],
                most: int = 33) -> float:
    """Voxels read along ``axis`` by blocks of ``size`` over it, summed (at most ``most`` blocks measured, scaled)."""
    starts = list(range(0, shape[axis], size))
    picked = starts if len(starts) <= most else [starts[round(i * (len(starts) - 1) / (most - 1))] for i in range(most)]
    total = 0
    for a in picked:
        core = tuple((a, min(a + size, n)) if ax == axis else (0, n) for ax, n in enumerate(shape))
        lo, hi = reach(core)[axis]
        total += hi - lo
    return total * len(starts) / len(picked)


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
    if reach is None:
        def reach(core: Region) -> Region:
            return tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(core, halo, shape))
    size = block_shape(tuple(shape), tuple(chunks), target_voxels, reach)
    ranges = [range(0, n, s) for n, s in zip(shape, size)]
    blocks = []
    for i, starts in enumerate(itertools.product(*ranges)):
        core = tuple((s, min(s + b, n)) for s, b, n in zip(starts, size, shape))
        blocks.append(Block(i, core, reach(core)))
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
