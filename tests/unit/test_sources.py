"""Which URLs a node may touch: its store and the allowed prefixes, on whole path segments, never a trick."""

import pytest

from dlorch.core.errors import BadInput
from dlorch.core.sources import Sources, file_url_path, parse_prefixes
from dlorch.core.store import DataStore

S3 = Sources("s3://bucket/dlorch", ("s3://lab-data/em", "https://data.example.org/em/"))


@pytest.mark.parametrize("url", [
    "s3://bucket/dlorch/blobs/abc.npy", "s3://bucket/dlorch", "s3://lab-data/em/vol.zarr",
    "https://data.example.org/em/a/b.tif", "S3://bucket/dlorch/x", "https://DATA.example.org/em/x",
])
def test_the_store_and_allowed_prefixes_are_allowed(url):
    assert S3.allows(url) and S3.check(url) == url


@pytest.mark.parametrize("url", [
    "/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/",
    "s3://bucket/dlorch-evil/x", "s3://bucket/other", "s3://bucket/dlorch/../secrets/x",
    "s3://bucket/dlorch/a/./b", "s3://lab-data/em2/x", "https://data.example.org/emx",
    "https://data.example.org@169.254.169.254/em/x", "http://data.example.org/em/x",
    "https://data.example.org:8443/em/x", "simplecache::s3://bucket/dlorch/x", "blobs/x.npy",
    "s3://bucket/dlorch/%2e%2e/x", "https://data.example.org/em/..%2f..%2fadmin",
])
def test_anything_else_is_refused_in_one_line(url):
    assert not S3.allows(url)
    with pytest.raises(BadInput) as e:
        S3.check(url, "write")
    assert str(e.value).startswith(f"refused to write {url}: nodes write only the store (s3://bucket/dlorch)")
    assert "DLORCH_ALLOW_URLS (s3://lab-data/em, https://data.example.org/em/)" in str(e.value)


def test_a_local_store_allows_its_own_tree_only(tmp_path):
    local = Sources(str(tmp_path / "home"))
    assert local.allows(str(tmp_path / "home" / "blobs" / "x.npy"))
    assert local.allows(f"file://{tmp_path}/home/blobs/x.npy")
    for url in (str(tmp_path / "home2" / "x"), str(tmp_path / "home" / ".." / "x"), f"file://otherhost{tmp_path}/home/x",
                str(tmp_path)):
        assert not local.allows(url), url
    assert "(none set)" in pytest.raises(BadInput, local.check, "/etc/passwd").value.args[0]


def test_prefixes_and_file_urls_parse():
    assert parse_prefixes(" s3://a/, https://b/c  /data ") == ("s3://a/", "https://b/c", "/data")
    assert file_url_path("file:///data/x%20y.tif") == "/data/x y.tif" and file_url_path("/data/x") is None
    assert file_url_path("file://otherhost/x") is None and file_url_path("s3://b/x") is None


def test_a_nodes_store_touches_nothing_outside_even_by_key(tmp_path):
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "store").mkdir()
    store = DataStore(str(tmp_path / "store"), allow=())
    for uri in (str(tmp_path / "secret.txt"), "../secret.txt", f"file://{tmp_path}/secret.txt"):
        with pytest.raises(BadInput, match="refused to read"):
            store.get_file(uri, tmp_path / "copy")
        with pytest.raises(BadInput, match="refused to read"):
            store.exists(uri)
    with pytest.raises(BadInput, match="refused to write"):
        store.write_bytes("../planted.txt", b"x")
    assert not (tmp_path / "copy").exists() and not (tmp_path / "planted.txt").exists()
    assert store.read_bytes(store.write_bytes("jobs/j/x.txt", b"ok")) == b"ok"
    client = DataStore(str(tmp_path / "store"))  # a client's store reads what its own user names
    assert client.read_bytes(str(tmp_path / "secret.txt")) == b"secret"
