"""Property-based fuzzing of the orchestrator's request handling (hypothesis).

Arbitrary JSON, and valid requests with fields replaced (by arbitrary JSON, or by values chosen to cross a
boundary: another job's id, a URI outside the attempt's keys, a negative count), removed or added, go to a real
orchestrator (SQLite queue, local ledger) holding a running job, a queued one and a blockwise one: directly to
``handle``, and through the queue signed with the right key, a wrong one or none, with a real, fuzzed or no
envelope. Whatever comes, nothing raises, every reply is one JSON object with a one-line reason, every ledger
record still parses and is strict JSON, and the jobs keep their invariants (one running attempt, the lease
holder's; artifacts under their attempt's keys; progress never backwards). New jobs replace those a request
moved on, so that every example can reach the deep paths.

Each run tries 150 fresh random examples (a failure prints how to reproduce it); ``DLORCH_FUZZ_EXAMPLES=5000``
tries more. Against the substring check of artifact ownership this test used to pass, it fails within seconds.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlorch.core.spec import AttemptOutcome, Job, JobStatus, NodeInfo
from dlorch.core.wire import Signer
from dlorch.orchestrator.leases import owned_by
from tests.unit.test_orchestrator import _register, _split, _submit, _take

SETTINGS = settings(max_examples=int(os.environ.get("DLORCH_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)


class Scene:
    """The jobs the requests are about: a blockwise job split into 3 blocks, a job running on n1 at epoch 2
    (attempt 1) and a queued one; made again once a request moved one of them on."""

    def __init__(self, o):
        self.o = o
        self.run = self.queued = self.blocks = ""

    def ready(self) -> None:
        o = self.o
        running = o.active.get(self.run)
        if running and running.status is JobStatus.RUNNING and self.queued in o.active and self.blocks in o.books:
            return
        while o.queue.jobs.receive(timeout=0) is not None:
            pass
        for n in ("n1", "n2"):
            _register(o, n)
        self.blocks = _split(o, "n2", 3)
        while o.queue.jobs.receive(timeout=0) is not None:
            pass
        self.run = _submit(o, epochs=8)
        _take(o, "n1")
        ck = f"{self.attempt}/ckpt/epoch-00002.ckpt"
        assert o.handle({"type": "progress", "job": self.run, "token": 1, "node": "n1", "epochs_done": 2,
                         "checkpoint": ck})["ok"]
        self.queued = _submit(o)

    @property
    def attempt(self) -> str:
        return f"{self.o.store_url}/jobs/{self.run}/attempts/1"

    def templates(self) -> list[dict]:
        """One valid request of every type about these jobs."""
        run, queued, blocks, att = self.run, self.queued, self.blocks, self.attempt
        return [
            {"type": "submit", "spec": {"kind": "train", "image": "/s/i.npy", "labels": "/s/l.npy"}, "job_id": "j-fz"},
            {"type": "cancel", "job": queued},
            {"type": "drain", "node": "n2"},
            {"type": "register", "node_info": {"id": "n3", "hostname": "h", "pid": 1, "cpus": 2, "memory_bytes": 1}},
            {"type": "heartbeat", "node": "n1", "job": run, "token": 1, "blocks": [[blocks, 0]]},
            {"type": "bye", "node": "n2"},
            {"type": "claim", "job": queued, "token": 1, "node": "n2"},
            {"type": "progress", "job": run, "token": 1, "node": "n1", "epochs_done": 3,
             "checkpoint": f"{att}/ckpt/epoch-00003.ckpt", "metrics": {"val_loss": 0.5}, "plan": {"epochs": 9}},
            {"type": "progress", "job": run, "token": 1, "node": "n1", "epochs_done": 0, "resumed_from": "",
             "why": "no readable checkpoint"},
            {"type": "finish", "job": run, "token": 1, "node": "n1", "outcome": "handed_back", "epochs_done": 3,
             "checkpoint": f"{att}/ckpt/epoch-00003.ckpt", "timings": {"train_s": 1.0}},
            {"type": "finish", "job": run, "token": 1, "node": "n1", "outcome": "succeeded", "model": f"{att}/m.ckpt"},
            {"type": "next_block", "node": "n1", "job": blocks, "after": 0, "done": [{"job": blocks, "block": 1}]},
            {"type": "block_done", "node": "n1", "job": blocks, "block": 2, "timings": {"compute_s": 1.0}},
            {"type": "block_failed", "node": "n2", "job": blocks, "block": 0, "error": "x", "permanent": False},
            {"type": "block_release", "node": "n1", "job": blocks, "block": 0},
        ]

    def tricky(self, key: str) -> list:
        """Values that cross a boundary, for a field named ``key``."""
        att, store = self.attempt, self.o.store_url
        uris = [f"s3://evil/jobs/{self.run}/attempts/1/x.ckpt", f"{att}/../../{self.queued}/x.ckpt", f"{att}0/x.ckpt",
                f"/elsewhere{att}/x.ckpt", f"{store}/jobs/{self.blocks}/output.zarr", f"{att}/ckpt/epoch-00001.ckpt"]
        ids = [self.run, self.queued, self.blocks, "n1", "n2", "../jobs/x", ""]
        numbers = [0, 1, 2, -1, 2**41, True, 1.5]
        return {"checkpoint": uris, "model": uris, "output": uris, "resumed_from": uris, "job": ids, "node": ids,
                "job_id": ids}.get(key, numbers)


@st.composite
def payloads(draw, scene: Scene) -> object:
    """Arbitrary JSON, a valid request, or a valid request with fields replaced, removed or added."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "valid", "json"]))
    if kind == "json":
        return draw(values)
    body = dict(draw(st.sampled_from(scene.templates())))
    if kind == "valid":
        return body
    keys = draw(st.permutations(sorted(body)))[:draw(st.sampled_from([1, 1, 1, 2, 3]))]
    for key in keys:
        how = draw(st.sampled_from(["tricky", "tricky", "json", "remove"]))
        if how == "remove":
            del body[key]
        else:
            body[key] = draw(st.sampled_from(scene.tricky(key)) if how == "tricky" else values)
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.text(max_size=8))] = draw(values)
    return body


@st.composite
def queued(draw, scene: Scene) -> bytes:
    """What lands on the events channel: signed right, wrong or not at all, with a real, fuzzed or no envelope."""
    body = draw(payloads(scene))
    how = draw(st.sampled_from(["signed", "signed", "wrong key", "unsigned", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if isinstance(body, dict):
        envelope = draw(st.sampled_from(["real", "fuzzed", "none"]))
        if envelope != "none":
            body = {**body, "rid": uuid.uuid4().hex, "sender": body.get("node", "client-1"),
                    "sent_at": scene.o.clock_(), "ch": "events"}
            if envelope == "fuzzed":
                body[draw(st.sampled_from(["rid", "sender", "sent_at", "oneway", "ch"]))] = draw(values)
    if how == "unsigned":
        return json.dumps(body).encode()
    return Signer(b"k" if how == "signed" else b"wrong").seal(body)


def _strict_json(data: bytes) -> object:
    def refuse(name):
        raise ValueError(f"{name} in a ledger record")

    return json.loads(data, parse_constant=refuse)


class Invariants:
    """What must hold of the ledger after any request; remembers the progress seen per attempt."""

    def __init__(self, o, root):
        self.o, self.root, self.progress = o, root, {}

    def check(self, since: float) -> None:
        """Every record written since ``since`` is strict JSON and reads as the ledger reads it."""
        for path in sorted(self.root.rglob("*.json")):
            if path.stat().st_mtime < since:
                continue
            _strict_json(path.read_bytes())
            if path.parent.name == "jobs":
                self._job(self.o.ledger.find(path.stem))  # a damaged record raises
            elif path.parent.name == "nodes":
                assert isinstance(self.o.ledger.node(path.stem), NodeInfo)  # a damaged one reads as None

    def _job(self, job: Job) -> None:
        tokens = [a.token for a in job.attempts]
        assert tokens == sorted(set(tokens)) and job.next_token >= (tokens[-1] if tokens else 1)
        running = [a for a in job.attempts if a.outcome is AttemptOutcome.RUNNING]
        assert running == ([job.attempts[-1]] if job.status is JobStatus.RUNNING else [])
        for field in ("checkpoint", "model"):
            uri = getattr(job, field)
            assert uri is None or any(owned_by(uri, f"{self.o.store_url}/jobs/{job.id}/attempts/{t}") for t in tokens)
        for att in job.attempts:
            key = (job.id, att.token)
            if att.epochs_done > att.epochs_start:  # progress made: never backwards from here
                assert att.epochs_done >= self.progress.get(key, 0)
                self.progress[key] = att.epochs_done


def test_any_payload_to_handle_changes_only_what_a_valid_request_may(orch, tmp_path):
    scene, inv = Scene(orch), Invariants(orch, tmp_path / "ledger")

    @SETTINGS
    @given(st.data())
    def run(data):
        scene.ready()
        since = time.time() - 1
        reply = orch.handle(data.draw(payloads(scene)))
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
        assert reply["ok"] or (isinstance(reply["reason"], str) and "\n" not in reply["reason"])
        json.dumps(reply, allow_nan=False)  # a reply can always be sealed
        inv.check(since)

    run()
    assert orch.handle({"type": "heartbeat", "node": "n1"})["ok"]


def test_any_bytes_on_the_queue_change_only_what_a_valid_request_may(orch, tmp_path):
    scene, inv = Scene(orch), Invariants(orch, tmp_path / "ledger")
    storage = orch.queue.events.storage

    @SETTINGS
    @given(st.data())
    def run(data):
        scene.ready()
        since = time.time() - 1
        storage.enqueue(data.draw(queued(scene)), 0)
        orch.step(timeout=0)
        assert storage.queue_size() == 0
        inv.check(since)

    run()
    assert orch.handle({"type": "heartbeat", "node": "n1"})["ok"]
