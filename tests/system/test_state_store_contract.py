"""The ledger's compare-and-set contract, run against every state store: a local directory and S3.

S3 is moto's server over HTTP (conditional PUTs), so the same assertions hold for the embedded default and
for the store a cloud deployment uses.
"""

import boto3
import pytest

from dlorch.core.errors import BadInput, StaleWrite, Unreachable
from dlorch.core.spec import Job, JobStatus, parse_spec
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.s3state import S3StateStore
from dlorch.orchestrator.statestore import LocalDirStateStore
from tests.conftest import free_port


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def ledger_bucket(s3_endpoint, monkeypatch):
    """An empty bucket named "ledger-test", removed again after the test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="ledger-test")
    yield client
    for obj in client.list_objects_v2(Bucket="ledger-test").get("Contents", []):
        client.delete_object(Bucket="ledger-test", Key=obj["Key"])
    client.delete_bucket(Bucket="ledger-test")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A fresh, empty state store of each kind."""
    if request.param == "local":
        return LocalDirStateStore(tmp_path / "ledger")
    request.getfixturevalue("ledger_bucket")
    return S3StateStore("ledger-test", "p/ledger", endpoint_url=request.getfixturevalue("s3_endpoint"))


def _job(i="j-1"):
    return Job(id=i, spec=parse_spec({"kind": "train", "image": "i", "labels": "l"}), created_at=1, updated_at=1)


class TestStateStoreContract:
    """What the ledger relies on from any store: conditional writes, and transitions guarded on top of them."""

    def test_cas(self, store):
        e1 = store.put("jobs/a", b"1", if_none_match=True)
        with pytest.raises(StaleWrite):
            store.put("jobs/a", b"2", if_none_match=True)
        e2 = store.put("jobs/a", b"2", if_match=e1)
        with pytest.raises(StaleWrite):
            store.put("jobs/a", b"3", if_match=e1)  # a stale writer
        assert store.get("jobs/a") == (b"2", e2)
        with pytest.raises(StaleWrite):
            store.put("jobs/b", b"1", if_match=e2)  # nothing there: the condition fails (S3 says 404)
        assert store.get("jobs/b") is None
        assert store.list("jobs") == ["jobs/a"]

    def test_ledger_transitions_are_guarded(self, store):
        led = Ledger(store)
        led.create(_job())
        led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
        with pytest.raises(StaleWrite, match="expected queued"):
            led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
        assert [j.id for j in led.jobs([JobStatus.RUNNING])] == ["j-1"]
        led.update("j-1", lambda j: setattr(j, "status", JobStatus.SUCCEEDED))
        with pytest.raises(StaleWrite, match="illegal transition"):
            led.update("j-1", lambda j: setattr(j, "status", JobStatus.QUEUED))
        with pytest.raises(BadInput, match="no job"):
            led.get("j-nope")
        assert led.get("1").status is JobStatus.SUCCEEDED  # unique suffix resolves

    def test_delete_and_the_index_of_jobs_that_may_run(self, store):
        store.put("x/a", b"1")
        store.delete("x/a")
        store.delete("x/never-written")  # nothing there: no error
        assert store.get("x/a") is None and store.list("x") == []
        led = Ledger(store)
        for i in ("j-1", "j-2", "j-3"):
            led.create(_job(i))
        led.update("j-2", lambda j: setattr(j, "status", JobStatus.CANCELLED))
        assert [j.id for j in led.active_jobs()] == ["j-1", "j-3"]
        assert store.list("active") == ["active/j-1", "active/j-3"]


    def test_a_record_written_last_by_this_ledger_is_written_again_unread_and_a_newer_leaders_write_is_fenced(
            self, store):
        old = Ledger(Counting(store))
        old.term = 1
        old.create(_job())
        old.store.calls.clear()
        old.update("j-1", lambda j: j.log(2.0, "by the leader"))
        assert old.store.calls == [("put", "jobs/j-1")]  # one conditional PUT on the etag it wrote
        newer = Ledger(store)
        newer.term = 2  # a newer leader (this one was deposed without knowing it yet)
        newer.update("j-1", lambda j: j.log(3.0, "by the newer leader"))
        with pytest.raises(StaleWrite, match="newer orchestrator"):
            old.update("j-1", lambda j: j.log(4.0, "by the deposed leader"))
        assert [text for _, text in newer.get("j-1").events][-2:] == ["by the leader", "by the newer leader"]


class Counting:
    """A state store that records the requests made of it."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def get(self, key):
        self.calls.append(("get", key))
        return self.inner.get(key)

    def put(self, key, data, **kw):
        self.calls.append(("put", key))
        return self.inner.put(key, data, **kw)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, key):
        self.inner.delete(key)


def test_missing_bucket_is_one_line(ledger_bucket, s3_endpoint):
    st = S3StateStore("no-such-bucket", "x", endpoint_url=s3_endpoint)
    with pytest.raises(Unreachable, match="bucket 'no-such-bucket' does not exist"):
        st.put("jobs/a", b"1")
