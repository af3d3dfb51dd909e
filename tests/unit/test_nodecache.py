"""The node cache: copies checked by content (not size), fetched again when the store's object changes."""

import os
import time

from dlorch.core.store import DataStore
from dlorch.nodeagent import nodecache
from dlorch.nodeagent.nodecache import fetch_cached


def _store(tmp_path):
    store, src = DataStore(str(tmp_path / "store"), allow=()), tmp_path / "m.ckpt"
    src.write_bytes(bytes(range(256)) * 40)
    return store, src, tmp_path / "cache"


def test_a_same_size_tampered_copy_is_fetched_again_even_with_its_times_restored(tmp_path):
    store, src, cache = _store(tmp_path)
    uri = store.put_file(src, "jobs/j-1/attempts/1/model.ckpt")  # not content-addressed: hashed when fetched
    t: dict = {}
    local = fetch_cached(store, cache, uri, t)
    assert fetch_cached(store, cache, uri, t) == local and t["downloads"] == 1
    st = local.stat()
    data = local.read_bytes()
    local.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size
    os.utime(local, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert fetch_cached(store, cache, uri, t).read_bytes() == src.read_bytes() and t["downloads"] == 2
    nodecache._verified.clear()  # a new process hashes the copy once, and keeps it
    assert fetch_cached(store, cache, uri, t) == local and t["downloads"] == 2


def test_a_rewritten_store_object_of_the_same_size_is_fetched_again(tmp_path):
    store, src, cache = _store(tmp_path)
    uri = store.put_file(src, "jobs/j-1/attempts/1/model.ckpt")
    t: dict = {}
    fetch_cached(store, cache, uri, t)
    time.sleep(0.01)
    src.write_bytes(bytes(reversed(src.read_bytes())))
    store.put_file(src, "jobs/j-1/attempts/1/model.ckpt")
    assert fetch_cached(store, cache, uri, t).read_bytes() == src.read_bytes() and t["downloads"] == 2


def test_a_copy_without_a_record_is_fetched_again(tmp_path):
    store, src, cache = _store(tmp_path)
    uri = store.put_file(src, "models/m.ckpt")
    t: dict = {}
    local = fetch_cached(store, cache, uri, t)
    (cache / nodecache.RECORDS / f"{local.name}.json").unlink()  # e.g. cached by an older version
    assert fetch_cached(store, cache, uri, t) == local and t["downloads"] == 2
