"""Regions read straight from local chunk files equal zarr's, for every layout the reader takes on."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from dlorch.core.chunkfiles import ChunkFileReader, chunk_reader

REGIONS = [
    (slice(None),),
    (slice(1, 2), slice(0, 37), slice(5, 50)),
    (slice(2, 5), slice(30, 70), slice(0, 9)),  # ends in the edge chunks
    (slice(0, 0), slice(None), slice(None)),  # empty
    (slice(3, 4),),  # fewer slices than axes
]


def _volume(tmp_path, name, dtype="uint8", **kw):
    shape = (5, 70, 50)
    data = (np.random.default_rng(0).random(shape) * 200 - (0 if np.dtype(dtype).kind == "u" else 100)).astype(dtype)
    vol = zarr.create_array(str(tmp_path / name), shape=shape, chunks=(2, 32, 16), dtype=dtype, fill_value=7, **kw)
    vol[...] = data
    return vol, data


@pytest.mark.parametrize("layout", [
    {"zarr_format": 3},
    {"zarr_format": 3, "compressors": None},
    {"zarr_format": 3, "compressors": GzipCodec()},
    {"zarr_format": 3, "compressors": BloscCodec()},
    {"zarr_format": 3, "compressors": ZstdCodec(level=3), "dtype": "float32"},
    {"zarr_format": 3, "dtype": "int16"},
    {"zarr_format": 2},
    {"zarr_format": 2, "compressors": None, "dtype": "float64"},
    {"zarr_format": 2, "compressors": numcodecs.GZip(), "dtype": "uint16"},
])
def test_regions_equal_zarrs_for_every_layout_read_from_files(tmp_path, layout):
    vol, data = _volume(tmp_path, "v.zarr", **layout)
    reader = chunk_reader(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    assert isinstance(reader, ChunkFileReader)
    for region in REGIONS:
        got = reader[region]
        np.testing.assert_array_equal(got, data[region])
        assert got.dtype == data.dtype
    assert reader.enabled and reader.checked
    assert reader.shape == vol.shape and reader.chunks == vol.chunks and reader.ndim == 3  # the rest is zarr's


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    vol = zarr.create_array(str(tmp_path / "v.zarr"), shape=(4, 40), chunks=(2, 16), dtype="uint8", fill_value=9)
    vol[0:2, 0:16] = 1
    reader = chunk_reader(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    expected = np.full((4, 40), 9, np.uint8)
    expected[0:2, 0:16] = 1
    np.testing.assert_array_equal(reader[:, :], expected)


def test_other_indexes_and_layouts_go_to_zarr(tmp_path):
    _volume(tmp_path, "v.zarr")
    vol = zarr.open_array(str(tmp_path / "v.zarr"), mode="r")
    reader = chunk_reader(vol)
    np.testing.assert_array_equal(reader[2], vol[2])  # an integer index
    np.testing.assert_array_equal(reader[:, ::2], vol[:, ::2])  # a step
    assert not reader.checked  # neither went through the files
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 64), chunks=(2, 16), shards=(4, 32), dtype="uint8")
    assert chunk_reader(sharded) is sharded
    fortran = zarr.create_array(str(tmp_path / "f.zarr"), shape=(4, 64), chunks=(2, 16), dtype="uint8", zarr_format=2,
                                order="F")
    assert chunk_reader(fortran) is fortran
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 4), chunks=(2, 2), dtype="uint8")
    assert chunk_reader(in_memory) is in_memory


def test_a_reader_that_disagrees_with_zarr_turns_itself_off(tmp_path):
    vol, data = _volume(tmp_path, "v.zarr")
    reader = chunk_reader(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    reader.decode = lambda raw: bytes(np.zeros(2 * 32 * 16, np.uint8))  # a misread layout
    np.testing.assert_array_equal(reader[0:2, 0:40, 0:20], data[0:2, 0:40, 0:20])  # zarr's answer is returned
    assert not reader.enabled
    np.testing.assert_array_equal(reader[1:3], data[1:3])


def test_a_corrupt_chunk_raises(tmp_path):
    _volume(tmp_path, "v.zarr")
    reader = chunk_reader(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    reader[0:1, 0:10, 0:10]  # the checked first read
    (tmp_path / "v.zarr" / "c" / "1" / "0" / "0").write_bytes(b"not zstd at all")
    with pytest.raises(Exception):
        reader[2:3, 0:10, 0:10]
