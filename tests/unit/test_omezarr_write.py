"""A whole result written as an OME-Zarr pyramid block by block: no block larger than the bound is read,
and every level is what downsampling the whole volume gives."""

import math

import numpy as np
import zarr

from dlorch.core import omezarr


class _Reads:
    """A zarr array that records the voxels of every read (the client's fetched result)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(out.size)
        return out


def test_write_blocks_tile_the_volume_in_whole_chunks_under_the_bound():
    shape, chunks = (70, 300, 260), (64, 64, 64)
    blocks = omezarr.write_blocks(shape, chunks, max_voxels=64 * 128 * 128)
    covered = np.zeros(shape, np.uint8)
    for core in blocks:
        covered[tuple(slice(a, b) for a, b in core)] += 1
        assert math.prod(b - a for a, b in core) <= 64 * 128 * 128
        assert all(a % c == 0 for (a, _), c in zip(core, chunks))  # starts on the chunk grid
    assert covered.min() == covered.max() == 1


def test_a_3d_volume_is_read_and_downsampled_block_by_block_into_every_level(tmp_path, monkeypatch):
    monkeypatch.setattr(omezarr, "WRITE_BLOCK_VOXELS", 64**3)
    rng = np.random.default_rng(0)
    grid = omezarr.Grid(("z", "y", "x"), (0.5, 0.5, 0.5), "micrometer")
    for name, data, labels in (("seg", rng.integers(1, 4, (128, 200, 176), dtype=np.uint8), True),
                               ("den", rng.normal(100, 20, (128, 200, 176)).astype(np.float32), False)):
        stored = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=data.shape, dtype=data.dtype,
                                   chunks=(32, 64, 64))
        stored[...] = data
        source = _Reads(stored)
        omezarr.write_array(source, str(tmp_path / f"{name}.ome.zarr"), grid, labels=labels)
        assert max(source.reads) <= 64**3 and sum(source.reads) == data.size  # each voxel read once
        p = omezarr.load_pyramid(str(tmp_path / f"{name}.ome.zarr"))
        assert p.levels == 3 and p.factors == (2, 2, 2)
        expected = data
        for n in range(p.levels):
            if n:
                expected = omezarr.downsample(expected, p.factors, labels)
            level = omezarr.read_level(str(tmp_path / f"{name}.ome.zarr"), n)
            np.testing.assert_allclose(level, expected, rtol=1e-6, err_msg=f"{name} level {n}")
