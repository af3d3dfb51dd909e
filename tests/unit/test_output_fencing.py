"""A blockwise output belongs to one split: a stale planner's split records nothing, and the blocks
learn which split (planner attempt) their output's stamp must name (simulated clock)."""

from dlorch.core.spec import JobStatus
from tests.unit.test_orchestrator import _register


def _claim(o, node):
    while (msg := o.queue.jobs.receive(timeout=0.5))["kind"] == "blocks":
        pass
    assert o.handle({"type": "claim", "job": msg["job"], "token": msg["token"], "node": node})["ok"]
    return msg["token"]


def _split_report(o, jid, token, node, n_blocks):
    blocks = [{"index": i, "core": [[i, i + 1], [0, 8]], "read": [[i, i + 1], [0, 8]]} for i in range(n_blocks)]
    return o.handle({"type": "finish", "job": jid, "token": token, "node": node, "outcome": "split",
                     "output": f"{o.store_url}/jobs/{jid}/output.zarr", "blocks": blocks, "norm": {},
                     "voxels": 8 * n_blocks})


def test_a_stale_planners_split_is_refused_and_blocks_learn_the_newer_split(orch):
    for n in ("old", "new", "other"):
        _register(orch, n)
    spec = {"kind": "predict", "image": "/s/v.zarr", "model": "/s/m.ckpt", "output_format": "zarr"}
    jid = orch.handle({"type": "submit", "spec": spec})["job"]
    assert _claim(orch, "old") == 1
    orch.clock_.t += 11  # the planner is paused past its lease
    orch.maintain(orch.clock_())
    assert _claim(orch, "new") == 2
    assert _split_report(orch, jid, 2, "new", 3) == {"ok": True, "status": "waiting"}

    stale = _split_report(orch, jid, 1, "old", 5)  # the paused planner wakes and reports its own plan
    assert not stale["ok"] and "does not hold the lease" in stale["reason"]
    plan = orch.ledger.block_plan(jid)
    assert plan["split"] == 2 and len(plan["blocks"]) == 3
    assert orch.ledger.get(jid).blocks["total"] == 3 and orch.ledger.get(jid).status is JobStatus.WAITING

    reply = orch.handle({"type": "next_block", "node": "new", "job": jid})
    assert reply["context"]["split"] == 2  # a block writes only into the array split 2 stamped
    orch._drop_book(jid)  # as after an orchestrator restart: the book and its context come from the plan
    again = orch.handle({"type": "next_block", "node": "other", "job": jid})
    assert again["job"] == jid and again["context"]["split"] == 2
