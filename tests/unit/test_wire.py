"""Signed messages and the ledger's compare-and-set store."""

import pytest

from dlorch.core.errors import BadInput, StaleWrite
from dlorch.core.spec import Job, JobStatus, parse_spec
from dlorch.core.wire import ForgedMessage, Signer
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.statestore import LocalDirStateStore


def test_signed_roundtrip_and_tamper():
    s = Signer(b"k1")
    data = s.seal({"job": "j-1", "token": 2})
    assert s.open(data) == {"job": "j-1", "token": 2}
    with pytest.raises(ForgedMessage):
        s.open(data.replace(b'"token":2', b'"token":3'))
    with pytest.raises(ForgedMessage):
        Signer(b"other").open(data)
    with pytest.raises(ForgedMessage):
        s.open(b'{"job":"j-1"}')  # unsigned


def test_cas_contract(tmp_path):
    st = LocalDirStateStore(tmp_path)
    e1 = st.put("a/x", b"1", if_none_match=True)
    with pytest.raises(StaleWrite):
        st.put("a/x", b"2", if_none_match=True)
    e2 = st.put("a/x", b"2", if_match=e1)
    with pytest.raises(StaleWrite):
        st.put("a/x", b"3", if_match=e1)  # a stale writer
    assert st.get("a/x") == (b"2", e2)
    assert st.list("a") == ["a/x"]


def _job(i="j-1"):
    return Job(id=i, spec=parse_spec({"kind": "train", "image": "i", "labels": "l"}), created_at=1, updated_at=1)


def test_ledger_transitions_are_guarded(tmp_path):
    led = Ledger(LocalDirStateStore(tmp_path))
    led.create(_job())
    led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
    with pytest.raises(StaleWrite, match="expected queued"):
        led.update("j-1", lambda j: setattr(j, "status", JobStatus.RUNNING), expect=[JobStatus.QUEUED])
    led.update("j-1", lambda j: setattr(j, "status", JobStatus.SUCCEEDED))
    with pytest.raises(StaleWrite, match="illegal transition"):
        led.update("j-1", lambda j: setattr(j, "status", JobStatus.QUEUED))
    with pytest.raises(BadInput, match="no job"):
        led.get("j-nope")
    assert led.get("1").status is JobStatus.SUCCEEDED  # unique suffix resolves
