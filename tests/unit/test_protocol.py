"""The wire protocol's models and replay rules (pure: no queue, no clock but the one given)."""

import logging
import math

import pytest

from dlorch.core import protocol
from dlorch.core.protocol import Envelope, Finish, Invalid
from dlorch.core.wire import ForgedMessage, Signer
from dlorch.nodeagent.reports import report
from dlorch.orchestrator.replay import Refused, ReplayGuard


def _env(rid="a" * 32, sender="n1", sent_at=1000.0, **kw):
    return Envelope(rid=rid, sender=sender, sent_at=sent_at, **kw)


@pytest.mark.parametrize("body, problem", [
    ({"type": "claim", "job": "j-1", "token": "1", "node": "n1"}, "token"),  # strict: no strings for numbers
    ({"type": "claim", "job": "j-1", "token": True, "node": "n1"}, "token"),
    ({"type": "claim", "job": "../jobs/x", "token": 1, "node": "n1"}, "job"),
    ({"type": "claim", "job": "j-1", "token": 1, "node": "n1", "extra": 1}, "extra"),
    ({"type": "progress", "job": "j-1", "token": 1, "node": "n1", "epochs_done": -1}, "epochs_done"),
    ({"type": "progress", "job": "j-1", "token": 1, "node": "n1", "epochs_done": 1, "metrics": {"l": math.nan}},
     "finite"),
    ({"type": "progress", "job": "j-1", "token": 1, "node": "n1", "epochs_done": 1, "plan": {"a": [math.inf]}},
     "finite"),
    ({"type": "finish", "job": "j-1", "token": 1, "node": "n1", "outcome": "expired"}, "orchestrator's"),
    ({"type": "heartbeat", "node": "n1", "blocks": [["j-1", 0]] * 5000}, "blocks"),
    ({"type": "nope"}, "unknown request"),
    ({"type": ["heartbeat"]}, "unknown request"),
    ({}, "unknown request"),
])
def test_a_body_that_is_not_a_request_is_one_line_naming_the_field(body, problem):
    with pytest.raises(Invalid) as e:
        protocol.parse_request(body)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_every_request_type_parses_from_its_own_json():
    r = protocol.parse_request({"type": "heartbeat", "node": "n1", "blocks": [["j-1", 3]]})
    assert isinstance(r, protocol.Heartbeat) and r.blocks == [("j-1", 3)]
    f = protocol.parse_request({"type": "finish", "job": "j-1", "token": 2, "node": "n1", "outcome": "split",
                                "blocks": [{"index": 0, "core": [[0, 1]], "read": [[0, 2]]}], "output": "/o.zarr"})
    assert isinstance(f, Finish) and f.outcome.value == "split" and f.blocks[0].read == [(0, 2)]
    assert protocol.parse_request(f.model_dump(mode="json")) == f
    assert len(protocol.parse_request({**f.model_dump(mode="json"), "error": "x" * 10_000}).error) == protocol.MAX_TEXT


def test_replies_carry_only_what_the_handler_set_and_junk_replies_become_refusals(caplog):
    assert protocol.NextBlockReply(block=None).wire() == {"ok": True, "block": None}
    assert protocol.HeartbeatReply(register_again=True).wire() == {"ok": True, "register": True}
    with caplog.at_level(logging.WARNING, logger="dlorch.protocol"):
        got = protocol.parse_reply(protocol.HeartbeatReply, {"ok": True, "drain": "yes", "jobs_gone": 7})
    assert not got.ok and not got.drain and "malformed" in got.reason
    assert any("dropped a malformed HeartbeatReply" in r.message for r in caplog.records)


def test_a_dispatch_leaves_out_a_default_priority_and_keeps_another():
    assert protocol.Dispatch(job="j-1", token=1, kind="train").wire() == {"job": "j-1", "token": 1, "kind": "train"}
    assert protocol.Dispatch(job="j-1", token=1, kind="train", priority=7).wire()["priority"] == 7
    assert protocol.parse_dispatch({"job": 5, "token": 1, "kind": "train"}) is None


def test_a_report_loses_its_non_finite_numbers_with_a_line_each(caplog):
    fields = {"job": "j-1", "token": 1, "node": "n1", "outcome": "succeeded", "metrics": {"val_loss": math.nan,
              "val_iou": 0.5}, "timings": {"train_s": math.inf}, "plan": {"stats": {"mean": math.nan}, "k": 2}}
    with caplog.at_level(logging.WARNING, logger="dlorch.agent"):
        got = report(Finish, fields)
    assert got.metrics == {"val_iou": 0.5} and got.timings == {} and got.plan == {"stats": {"mean": None}, "k": 2}
    lines = [r.getMessage() for r in caplog.records]
    assert any("metric val_loss is nan" in m for m in lines) and any("plan.stats.mean" in m for m in lines)


def test_the_signer_refuses_non_json_numbers_and_deep_nesting():
    s = Signer(b"k")
    body = b'{"x":NaN}'
    with pytest.raises(ForgedMessage):
        s.open(body + b"\n" + s._sign(body))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ForgedMessage):
        s.open(deep + b"\n" + s._sign(deep))


def test_a_duplicate_is_refused_and_its_reply_kept():
    g = ReplayGuard(fresh_s=60)
    assert g.check(_env(), "claim", 1000.0) is None
    g.keep_reply(_env(), {"ok": True})
    assert g.check(_env(), "claim", 1001.0) is Refused.DUPLICATE
    assert g.check(_env(sent_at=1002.0), "claim", 1002.0) is Refused.DUPLICATE  # a re-sent copy, stamped anew
    assert g.reply_to(_env()) == {"ok": True}
    assert g.check(_env(sender="n2"), "claim", 1001.0) is None  # another sender's request id space


def test_stale_and_future_send_times_are_refused_and_old_ids_forgotten():
    g = ReplayGuard(fresh_s=60)
    assert g.check(_env(sent_at=900.0), "claim", 1000.0) is Refused.STALE
    assert g.check(_env(sent_at=1100.0), "claim", 1000.0) is Refused.STALE
    assert g.check(_env(sent_at=1000.0), "claim", 1000.0) is None
    assert g.check(_env(rid="b" * 32, sent_at=1050.0), "claim", 1050.0) is None
    assert g.check(_env(sent_at=1000.0), "claim", 1070.0) is Refused.STALE  # forgotten, and stale with it
    assert len(g._seen) == 1


def test_a_heartbeat_older_than_the_last_one_is_superseded():
    g = ReplayGuard(fresh_s=60)
    assert g.check(_env(rid="1" * 32, sent_at=1010.0), "heartbeat", 1010.0) is None
    assert g.check(_env(rid="2" * 32, sent_at=1005.0), "heartbeat", 1011.0) is Refused.SUPERSEDED
    assert g.check(_env(rid="3" * 32, sent_at=1005.0), "progress", 1011.0) is None  # only heartbeats are ordered
    assert g.check(_env(rid="4" * 32, sent_at=1013.0), "heartbeat", 1013.0) is None


def test_memory_is_bounded_and_what_is_forgotten_early_is_refused():
    g = ReplayGuard(fresh_s=60, capacity=3)
    for i in range(5):
        assert g.check(_env(rid=f"{i:032x}", sent_at=1000.0 + i), "claim", 1005.0) is None
    assert len(g._seen) <= 4
    assert g.check(_env(rid=f"{0:032x}", sent_at=1000.0), "claim", 1005.0) is Refused.STALE  # below the floor
