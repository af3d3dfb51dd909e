"""Outputs never destroy what is already there; damaged cached copies are fetched again (in-process checks)."""

from pathlib import Path

import numpy as np
import pytest
import zarr

from dlorch.core.errors import BadInput
from tests.conftest import synthetic_pair


def _precious_dir(path):
    path.mkdir(parents=True)
    (path / "precious.txt").write_text("precious")
    return path


# -- outputs -------------------------------------------------------------------------------------------
def test_a_zarr_output_over_a_directory_that_is_not_a_zarr_array_is_refused_and_kept(tmp_path):
    from dlorch.core.imageio import check_output_path, write_image
    from dlorch.core.volumes import check_output_volume, create_volume

    a = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    data = _precious_dir(tmp_path / "data.zarr")
    for refuse in (lambda: write_image(a, data), lambda: check_output_path(data),
                   lambda: create_volume(str(data), a.shape, (1, 8, 8), "uint8"), lambda: check_output_volume(str(data))):
        with pytest.raises(BadInput, match="exists and is not a zarr array; remove it or choose another path"):
            refuse()
    assert (data / "precious.txt").read_text() == "precious" and len(list(data.iterdir())) == 1
    group = tmp_path / "group.zarr"  # a zarr group may hold arrays of the user's: not an output to replace
    zarr.open_group(str(group), mode="w").create_array("raw", shape=(4,), dtype="uint8")
    with pytest.raises(BadInput, match="not a zarr array"):
        write_image(a, group)
    assert "raw" in dict(zarr.open_group(str(group), mode="r").arrays())

    out = tmp_path / "out.zarr"  # a previous output (a zarr array) is replaced, as before
    write_image(a, out)
    write_image(a + 1, out)
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], a + 1)
    assert create_volume(str(out), a.shape, (1, 8, 8), "uint8").shape == a.shape


def test_output_paths_that_cannot_be_written_are_one_clear_line(tmp_path):
    from dlorch.core.imageio import check_output_path, write_image

    a = np.zeros((2, 8, 8), np.float32)
    (tmp_path / "afile").write_text("x")
    _precious_dir(tmp_path / "dir.tif")
    cases = {tmp_path / "dir.tif": "is a directory; give a file name ending in .tif",
             tmp_path / "afile" / "o.npy": "afile is a file, not a directory",
             tmp_path / "afile" / "deeper" / "o.npy": "afile is a file, not a directory"}
    for path, message in cases.items():
        for call in (lambda: write_image(a, path), lambda: check_output_path(path)):
            with pytest.raises(BadInput, match=message.replace(".", r"\.")) as e:
                call()
            assert "\n" not in str(e.value)
    assert (tmp_path / "dir.tif" / "precious.txt").exists()
    assert not list(tmp_path.glob(".dlorch-probe-*"))  # the write probe leaves nothing behind
    # Missing directories are created, as before.
    write_image(a, tmp_path / "new" / "dir" / "o.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "new" / "dir" / "o.npy"), a)


def test_an_output_that_is_an_input_is_refused(tmp_path):
    from dlorch.core.imageio import check_output_path
    from dlorch.core.volumes import check_output_volume

    img, lab = synthetic_pair(tmp_path)
    for out, inputs in ((lab, [img, lab]), (tmp_path / "pair.npz", [f"{tmp_path}/pair.npz:labels"]),
                        (tmp_path / "self.zarr", [f"file://{tmp_path}/self.zarr"]),
                        ("s3://bucket/self.zarr", ["s3://bucket/self.zarr/"])):
        with pytest.raises(BadInput, match="is the input; choose another path"):
            check_output_path(out, inputs)
    with pytest.raises(BadInput, match="is the input; choose another path"):
        check_output_volume(str(tmp_path / "v.zarr"), f"file://{tmp_path}/v.zarr")
    check_output_path(tmp_path / "other.npy", [img, lab])  # any other path is fine


# -- the node's cache ----------------------------------------------------------------------------------
def test_cached_copies_are_checked_by_hash_or_size_and_fetched_again(tmp_path):
    from dlorch.core.store import DataStore
    from dlorch.nodeagent.nodecache import fetch_cached

    store, cache = DataStore(str(tmp_path / "store")), tmp_path / "cache"
    src = tmp_path / "m.ckpt"
    src.write_bytes(bytes(range(256)) * 40)
    blob = store.put_blob(src)
    other = store.put_file(src, "models/m.ckpt")  # not content-addressed: checked by size
    for uri, damage in ((blob, lambda b: b"X" + b[1:]), (other, lambda b: b[:1000])):
        t: dict = {}
        local = fetch_cached(store, cache, uri, t)
        assert fetch_cached(store, cache, uri, t) == local and t["downloads"] == 1
        local.write_bytes(damage(local.read_bytes()))
        assert fetch_cached(store, cache, uri, t).read_bytes() == src.read_bytes() and t["downloads"] == 2
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporary left behind


def test_a_local_store_links_a_file_handed_over_and_copies_one_that_is_not(tmp_path):
    from dlorch.core.store import DataStore

    store = DataStore(str(tmp_path / "store"))
    src = tmp_path / "epoch-0001.ckpt"
    src.write_bytes(b"weights" * 1000)
    store.put_file(src, "jobs/j/ckpt/1.ckpt", link=True)
    store.put_file(src, "jobs/j/ckpt/2.ckpt")
    linked, copied = tmp_path / "store/jobs/j/ckpt/1.ckpt", tmp_path / "store/jobs/j/ckpt/2.ckpt"
    assert linked.read_bytes() == copied.read_bytes() == src.read_bytes()
    assert linked.stat().st_ino == src.stat().st_ino and copied.stat().st_ino != src.stat().st_ino
    src.unlink()  # the engine deletes its old checkpoints: what the store published stays
    assert linked.read_bytes() == b"weights" * 1000
