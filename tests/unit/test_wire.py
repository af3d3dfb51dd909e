"""Signed messages: a sealed message opens; a tampered, foreign-key or unsigned one is refused.

The ledger's compare-and-set store is checked in tests/system/test_state_store_contract.py (local and S3)."""

import pytest

from dlorch.core.wire import ForgedMessage, Signer


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
