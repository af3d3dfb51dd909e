"""The ledger's CAS contract on S3, through moto's server over HTTP (conditional PUTs)."""

import boto3
import pytest

from dlorch.core.errors import StaleWrite, Unreachable
from dlorch.core.spec import Job, JobStatus, parse_spec
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.s3state import S3StateStore
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
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="ledger-test")
    yield client
    for obj in client.list_objects_v2(Bucket="ledger-test").get("Contents", []):
        client.delete_object(Bucket="ledger-test", Key=obj["Key"])
    client.delete_bucket(Bucket="ledger-test")


def test_s3_cas_contract(s3, s3_endpoint):
    st = S3StateStore("ledger-test", "p/ledger", endpoint_url=s3_endpoint)
    e1 = st.put("jobs/a", b"1", if_none_match=True)
    with pytest.raises(StaleWrite):
        st.put("jobs/a", b"2", if_none_match=True)
    e2 = st.put("jobs/a", b"2", if_match=e1)
    with pytest.raises(StaleWrite):
        st.put("jobs/a", b"3", if_match=e1)
    assert st.get("jobs/a") == (b"2", e2)
    assert st.get("jobs/b") is None
    assert st.list("jobs") == ["jobs/a"]


def test_s3_ledger_guards_transitions(s3, s3_endpoint):
    led = Ledger(S3StateStore("ledger-test", "q/ledger", endpoint_url=s3_endpoint))
    led.create(Job(id="j-1", spec=parse_spec({"kind": "train", "image": "i", "labels": "l"}),
                   created_at=1, updated_at=1))
    led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
    with pytest.raises(StaleWrite):
        led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
    assert [j.id for j in led.jobs([JobStatus.RUNNING])] == ["j-1"]


def test_missing_bucket_is_one_line(s3, s3_endpoint):
    st = S3StateStore("no-such-bucket", "x", endpoint_url=s3_endpoint)
    with pytest.raises(Unreachable, match="bucket 'no-such-bucket' does not exist"):
        st.put("jobs/a", b"1")
