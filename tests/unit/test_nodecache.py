"""The node cache: copies checked by content (not size), fetched again when the store's object changes; LRU cap."""

import os
import time

from dlorch.core.store import DataStore
from dlorch.nodeagent import nodecache
from dlorch.nodeagent.nodecache import Entry, evictions, fetch_cached, trim_cache


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


def test_eviction_takes_the_least_recently_used_and_spares_copies_in_use():
    now = 10_000.0
    entries = [Entry("old", 50, now - 5000), Entry("mid", 50, now - 3000), Entry("new", 50, now - 1000)]
    assert evictions(entries, 120, now, min_idle_s=600) == ["old"]
    assert evictions(entries, 10, now, min_idle_s=600) == ["new", "mid", "old"]
    assert evictions(entries, 10, now, min_idle_s=2000) == ["mid", "old"]  # used 1000 s ago: maybe in use
    assert evictions(entries, 10, now, min_idle_s=4000) == ["old"]  # the cap is exceeded while copies are in use
    assert evictions(entries, 1000, now, min_idle_s=0) == []


def test_the_cache_is_trimmed_to_its_cap_by_last_use_and_killed_downloads_are_cleared(tmp_path):
    store, src, cache = _store(tmp_path)
    uris = []
    for i in range(3):
        f = tmp_path / f"in{i}.npy"
        f.write_bytes(bytes([i]) * 4000)
        uris.append(store.put_blob(f))
    t: dict = {}
    copies = [fetch_cached(store, cache, u, t) for u in uris]
    for age, uri in zip((3000, 1000, 2000), uris):  # in1 used last, then in2, then in0
        fetch_cached(store, cache, uri, t)
        record = cache / nodecache.RECORDS / f"{copies[uris.index(uri)].name}.json"
        os.utime(record, (time.time() - age, time.time() - age))
    left = cache / ".x.npy.fetch-dead"
    left.write_bytes(b"partial")
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    assert trim_cache(cache, 9000, min_idle_s=0) == [copies[0].name]
    assert not copies[0].exists() and copies[1].exists() and copies[2].exists() and not left.exists()
    assert not (cache / nodecache.RECORDS / f"{copies[0].name}.json").exists()
    assert fetch_cached(store, cache, uris[0], t).exists() and t["downloads"] == 4  # evicted: fetched again
