"""Regions read straight from local chunk files equal zarr's, for every layout the reader takes on."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from dlorch.core.chunkfiles import ChunkFiles, chunk_files

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
    reader = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    assert isinstance(reader, ChunkFiles)
    for region in REGIONS:
        got = reader[region]
        np.testing.assert_array_equal(got, data[region])
        assert got.dtype == data.dtype
    assert reader.enabled and reader.checked
    assert reader.shape == vol.shape and reader.chunks == vol.chunks and reader.ndim == 3  # the rest is zarr's


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    vol = zarr.create_array(str(tmp_path / "v.zarr"), shape=(4, 40), chunks=(2, 16), dtype="uint8", fill_value=9)
    vol[0:2, 0:16] = 1
    reader = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    expected = np.full((4, 40), 9, np.uint8)
    expected[0:2, 0:16] = 1
    np.testing.assert_array_equal(reader[:, :], expected)


def test_other_indexes_and_layouts_go_to_zarr(tmp_path):
    _volume(tmp_path, "v.zarr")
    vol = zarr.open_array(str(tmp_path / "v.zarr"), mode="r")
    reader = chunk_files(vol)
    np.testing.assert_array_equal(reader[2], vol[2])  # an integer index
    np.testing.assert_array_equal(reader[:, ::2], vol[:, ::2])  # a step
    assert not reader.checked  # neither went through the files
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 64), chunks=(2, 16), shards=(4, 32), dtype="uint8")
    assert chunk_files(sharded) is sharded
    fortran = zarr.create_array(str(tmp_path / "f.zarr"), shape=(4, 64), chunks=(2, 16), dtype="uint8", zarr_format=2,
                                order="F")
    assert chunk_files(fortran) is fortran
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 4), chunks=(2, 2), dtype="uint8")
    assert chunk_files(in_memory) is in_memory


def test_a_reader_that_disagrees_with_zarr_turns_itself_off(tmp_path):
    vol, data = _volume(tmp_path, "v.zarr")
    reader = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    reader.decode = lambda raw: bytes(np.zeros(2 * 32 * 16, np.uint8))  # a misread layout
    np.testing.assert_array_equal(reader[0:2, 0:40, 0:20], data[0:2, 0:40, 0:20])  # zarr's answer is returned
    assert not reader.enabled
    np.testing.assert_array_equal(reader[1:3], data[1:3])


def test_a_corrupt_chunk_raises(tmp_path):
    _volume(tmp_path, "v.zarr")
    reader = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    reader[0:1, 0:10, 0:10]  # the checked first read
    (tmp_path / "v.zarr" / "c" / "1" / "0" / "0").write_bytes(b"not zstd at all")
    with pytest.raises(Exception):
        reader[2:3, 0:10, 0:10]


@pytest.mark.parametrize("layout", [
    {"zarr_format": 3},
    {"zarr_format": 3, "compressors": None, "dtype": "float32"},
    {"zarr_format": 3, "compressors": GzipCodec(level=2), "dtype": "int16"},
    {"zarr_format": 3, "compressors": BloscCodec(cname="lz4", shuffle="bitshuffle")},
    {"zarr_format": 2, "compressors": numcodecs.Zstd(level=1), "dtype": "uint16"},
])
def test_whole_chunks_written_to_files_read_back_through_zarr(tmp_path, layout):
    vol, data = _volume(tmp_path, "v.zarr", **layout)
    files = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r+"))
    new = (data * 2 + 1).astype(data.dtype)
    files[0:2, 32:70, 16:50] = new[0:2, 32:70, 16:50]  # whole chunks, the last ones past the array's end
    files[4:5, 0:32, :] = new[4:5, 0:32, :]
    assert files.write_checked and files.writes_enabled
    expected = data.copy()
    expected[0:2, 32:70, 16:50] = new[0:2, 32:70, 16:50]
    expected[4:5, 0:32, :] = new[4:5, 0:32, :]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[...], expected)
    assert not list((tmp_path / "v.zarr").rglob("*.tmp"))


def test_a_partial_chunk_goes_to_zarr_and_a_fill_chunk_is_removed(tmp_path):
    vol, data = _volume(tmp_path, "v.zarr")
    files = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r+"))
    files[0:1, 0:10, 0:10] = np.zeros((1, 10, 10), np.uint8)  # part of a chunk: zarr reads, merges, writes
    assert not files.write_checked
    chunk = tmp_path / "v.zarr" / "c" / "1" / "0" / "0"
    assert chunk.exists()
    files[2:4, 0:32, 0:16] = np.full((2, 32, 16), 7, np.uint8)  # all fill value (7)
    assert not chunk.exists()
    expected = data.copy()
    expected[0:1, 0:10, 0:10] = 0
    expected[2:4, 0:32, 0:16] = 7
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[...], expected)


def test_a_writer_that_disagrees_with_zarr_turns_itself_off(tmp_path):
    vol, data = _volume(tmp_path, "v.zarr")
    files = chunk_files(zarr.open_array(str(tmp_path / "v.zarr"), mode="r+"))
    files.encode = numcodecs.GZip().encode  # not the array's zstd: zarr cannot read the chunk
    files[0:2, 0:32, 0:16] = np.ones((2, 32, 16), np.uint8)
    assert not files.writes_enabled  # zarr rewrote it, and writes from now on
    files[2:4, 0:32, 0:16] = np.full((2, 32, 16), 3, np.uint8)
    expected = data.copy()
    expected[0:2, 0:32, 0:16] = 1
    expected[2:4, 0:32, 0:16] = 3
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[...], expected)
