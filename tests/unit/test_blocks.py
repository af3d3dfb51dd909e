"""Pure block planning: chunk-aligned blocks that tile the volume once, halos clipped at the borders."""

import numpy as np
import pytest

from dlorch.core.blocks import block_shape, output_chunks, plan_blocks


@pytest.mark.parametrize("shape,chunks,halo,target", [
    ((10, 100, 130), (1, 32, 32), (0, 16, 16), 5000),
    ((300, 257), (64, 64), (8, 8), 20000),
    ((4, 64, 64), (2, 64, 64), (1, 0, 0), 10**9),
])
def test_blocks_tile_the_volume_exactly_once(shape, chunks, halo, target):
    blocks = plan_blocks(shape, chunks, halo, target)
    cover = np.zeros(shape, np.int32)
    for b in blocks:
        cover[b.core_slices()] += 1
        for (c0, c1), (r0, r1), h, n, ch in zip(b.core, b.read, halo, shape, chunks):
            assert c0 % ch == 0 and (c1 % ch == 0 or c1 == n)  # whole chunks: no shared chunk objects
            assert r0 == max(0, c0 - h) and r1 == min(n, c1 + h)
        region = np.zeros([r1 - r0 for r0, r1 in b.read])
        assert region[b.crop()].shape == tuple(c1 - c0 for c0, c1 in b.core)
    assert (cover == 1).all()
    assert [b.index for b in blocks] == list(range(len(blocks)))


def test_block_size_follows_the_target():
    small = plan_blocks((64, 512, 512), (1, 64, 64), (0, 32, 32), 64 * 64)
    large = plan_blocks((64, 512, 512), (1, 64, 64), (0, 32, 32), 2**20)
    assert len(small) == 64 * 64 and len(large) < len(small) / 100
    assert max(b.voxels for b in large) <= 1.5 * 2**20


@pytest.mark.parametrize("shape,chunks,itemsize,target", [
    ((120, 1024, 1024), (1, 256, 256), 1, 2**20),     # a slice per block: one chunk per block
    ((120, 1024, 1024), (1, 256, 256), 4, 2**24),     # 64 MiB float blocks: chunks under the limit
    ((64, 1000, 1000), (8, 128, 128), 1, 2**26),      # whole-axis (clipped) blocks of odd length
    ((300, 257), (64, 64), 1, 20000),
])
def test_output_chunks_are_whole_blocks_or_divide_them_under_the_limit(shape, chunks, itemsize, target):
    block = block_shape(shape, chunks, target)
    out = output_chunks(block, chunks, itemsize, limit=4 * 2**20)
    assert all(c <= o <= b for c, o, b in zip(chunks, out, block))
    assert np.prod(out) * itemsize <= 4 * 2**20 or out == tuple(min(c, b) for c, b in zip(chunks, block))
    # Every output chunk lies inside one block: no two blocks ever write the same chunk object.
    for b in plan_blocks(shape, chunks, (0,) * len(shape), target):
        for (c0, c1), o, n in zip(b.core, out, shape):
            assert c0 % o == 0 and (c1 % o == 0 or c1 == n)
    if np.prod(block) * itemsize <= 4 * 2**20:
        assert out == block  # a block that fits is one chunk


def test_mismatched_dimensions_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        plan_blocks((10, 10), (5,), (0, 0), 10)


def test_block_voxels_follow_throughput_within_memory():
    from dlorch.core.blocks import choose_block_voxels

    gib = 2**30
    slow, fast = choose_block_voxels(1e6, 16 * gib, 10), choose_block_voxels(1e8, 16 * gib, 10)
    assert slow == 3_000_000 and fast == 2**26 > slow  # ~3 s of compute, up to the ceiling
    assert choose_block_voxels(2e7, 1 * gib, 100) == gib // 8 // 100  # memory bounds it
    assert choose_block_voxels(10.0, 16 * gib, 100) == 2**18  # never below the floor


@pytest.mark.parametrize("size,roi,overlap", [(200, 64, 0.25), (64, 64, 0.25), (40, 48, 0.25), (1000, 96, 0.5)])
def test_windows_cover_the_axis_flush_with_both_ends(size, roi, overlap):
    from dlorch.core.blocks import window_starts

    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0 and (starts[-1] + roi == size or (size <= roi and starts == [0]))
    assert all(b - a <= int(roi * (1 - overlap)) for a, b in zip(starts, starts[1:]))  # no gaps, overlap kept
    assert starts == sorted(set(starts))


def test_a_block_reads_exactly_the_windows_that_touch_its_core():
    from dlorch.core.blocks import WindowGrid

    grid = WindowGrid((300, 257), (64, 64), 0.25)
    for block in plan_blocks((5, 300, 257), (1, 32, 32), (0, 0, 0), 5000, reach=grid.read_region):
        lo, hi = [r[0] for r in block.read[1:]], [r[1] for r in block.read[1:]]
        assert block.read[0] == block.core[0]  # a 2D network's slices need no neighbours
        inside = grid.inside(tuple(lo), tuple(hi))
        # every window over the core is inside the read region, and nothing else is read
        for ax, (a, b) in enumerate(block.core[1:]):
            touching = [s for s in grid.starts(ax) if s < b and s + 64 > a]
            assert sorted({w[ax] for w in inside}) == touching
            assert lo[ax] == touching[0] and hi[ax] == min(touching[-1] + 64, grid.shape[ax])


def test_a_block_covers_whole_windows_rather_than_recompute_them():
    # 1024 px windows over 1024 px slices: half-slice blocks would each run the whole slice's window.
    from dlorch.core.blocks import WindowGrid

    grid = WindowGrid((1024, 1024), (1024, 1024), 0.25)
    assert block_shape((120, 1024, 1024), (1, 256, 256), 2**20, grid.read_region) == (1, 1024, 1024)
    blocks = plan_blocks((120, 1024, 1024), (1, 256, 256), (0, 0, 0), 2**20, reach=grid.read_region)
    assert len(blocks) == 120 and all(b.read == b.core for b in blocks)


@pytest.mark.parametrize("shape,chunks,roi,target", [
    ((12, 200, 300), (2, 32, 32), (64, 64), 20000),
    ((40, 96, 130), (4, 16, 16), (48, 48, 48), 30000),
])
def test_the_block_shape_reads_least_of_all_shapes_near_the_target(shape, chunks, roi, target):
    import itertools

    from dlorch.core.blocks import WindowGrid

    grid = WindowGrid(shape[-len(roi):], roi, 0.25)

    def total_read(size):
        blocks = [tuple((s, min(s + b, n)) for s, b, n in zip(starts, size, shape))
                  for starts in itertools.product(*(range(0, n, b) for n, b in zip(shape, size)))]
        return sum(np.prod([hi - lo for lo, hi in grid.read_region(core)]) for core in blocks)

    chosen = block_shape(shape, chunks, target, grid.read_region)
    options = [sorted({min(n, c * 2**k) for k in range(12)}) for n, c in zip(shape, chunks)]
    near = [s for s in itertools.product(*options) if target / 2 <= np.prod(s) <= 1.5 * target]
    assert chosen in near and total_read(chosen) == min(total_read(s) for s in near)
