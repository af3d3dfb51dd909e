"""S3 conditional writes through moto's server: an ambiguous retried write is reconciled by reading back,
and an endpoint that ignores the conditions is refused before anything leads on it."""

import boto3
import pytest

from dlorch.core.errors import BadInput, StaleWrite
from dlorch.core.spec import Job, parse_spec
from dlorch.orchestrator.ledger import Leader, Ledger
from dlorch.orchestrator.s3state import S3StateStore


class LandsThenFails:
    """A client whose conditional PUT lands, then reports 412, as botocore does when it retries a write whose
    first answer was lost (the fault a healthy server cannot be made to produce: injected at the client seam)."""

    def __init__(self, client):
        self.client, self.armed = client, True

    def __getattr__(self, name):
        return getattr(self.client, name)

    def put_object(self, **kw):
        out = self.client.put_object(**kw)
        if self.armed and ("IfMatch" in kw or "IfNoneMatch" in kw):
            self.armed = False
            return self.client.put_object(**kw)  # the retry: its own condition now fails (412)
        return out


class IgnoresConditions:
    """An S3-compatible endpoint that drops If-Match / If-None-Match (some do)."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)

    def put_object(self, **kw):
        kw.pop("IfMatch", None)
        kw.pop("IfNoneMatch", None)
        return self.client.put_object(**kw)


def _client(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])


@pytest.mark.parametrize("first", ["create", "update"])
def test_a_write_that_landed_before_its_retry_failed_is_ours(s3, first):
    plain = S3StateStore("bucket", f"amb-{first}/ledger", client=_client(s3))
    etag = None if first == "create" else plain.put("jobs/a", b"0", if_none_match=True)
    flaky = S3StateStore("bucket", f"amb-{first}/ledger", client=LandsThenFails(_client(s3)))
    got = flaky.put("jobs/a", b"1", if_none_match=True) if first == "create" else flaky.put("jobs/a", b"1", if_match=etag)
    assert plain.get("jobs/a") == (b"1", got)


def test_a_write_that_lost_to_another_writer_still_fails(s3):
    store = S3StateStore("bucket", "lost/ledger", client=_client(s3))
    e1 = store.put("jobs/a", b"1", if_none_match=True)
    store.put("jobs/a", b"2", if_match=e1)
    with pytest.raises(StaleWrite):
        store.put("jobs/a", b"3", if_match=e1)
    assert store.get("jobs/a")[0] == b"2"


def test_an_endpoint_that_honours_conditions_passes_the_check_and_leaves_no_probe(s3):
    store = S3StateStore("bucket", "ok/ledger", client=_client(s3))
    store.verify_conditional_writes()
    assert store.list("_probe") == []


def test_an_endpoint_that_ignores_conditions_is_refused_before_anyone_leads(s3):
    ledger = Ledger(S3StateStore("bucket", "bad/ledger", client=IgnoresConditions(_client(s3))))
    me = Leader(id="o-1", hostname="h", pid=1, started_at=0, heartbeat_at=0)
    with pytest.raises(BadInput, match="ignores conditional writes") as e:
        ledger.claim_leadership(me, lease_s=30, now=0)
    assert ledger.leader() is None
    assert "\n" not in str(e.value)


def test_a_ledger_on_a_good_endpoint_leads_and_works(s3):
    ledger = Ledger(S3StateStore("bucket", "good/ledger", client=_client(s3)))
    me = Leader(id="o-1", hostname="h", pid=1, started_at=0, heartbeat_at=0)
    assert ledger.claim_leadership(me, lease_s=30, now=0)
    ledger.create(Job(id="j-1", spec=parse_spec({"kind": "train", "image": "i", "labels": "l"}),
                      created_at=1, updated_at=1))
    assert ledger.find("j-1").id == "j-1"
