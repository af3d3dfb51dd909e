"""Leadership without comparing clocks: the heartbeat counter, where a leader's process is, term fencing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dlorch.core.errors import StaleWrite
from dlorch.core.settings import Settings
from dlorch.core.spec import Job, NodeInfo, parse_spec
from dlorch.core.wire import Signer
from dlorch.orchestrator.leadership import Here, Leader, LeaderWatch, Verdict, dead_here, new_leader, where
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.queue import Queue
from dlorch.orchestrator.service import NotLeader, Orchestrator
from dlorch.orchestrator.statestore import LocalDirStateStore

LEASE = 10.0


def _elsewhere(leader_id: str = "far", beats: int = 0, term: int = 3) -> Leader:
    """A leader on another machine, its record just renewed by its own clock."""
    return Leader(id=leader_id, hostname="far-host", pid=4242, started_at=time.time(), heartbeat_at=time.time(),
                  term=term, beats=beats, boot_id="another-machine", pid_ns="pid:[4026531836]", pid_start=99)


def _job(job_id: str = "j-1") -> Job:
    spec = parse_spec({"kind": "predict", "image": "x.tif", "model": "m.ckpt"})
    return Job(id=job_id, spec=spec, created_at=1.0, updated_at=1.0)


def _node(node_id: str = "n1") -> NodeInfo:
    return NodeInfo(id=node_id, hostname="h", pid=1, cpus=2, memory_bytes=1, registered_at=1.0, heartbeat_at=1.0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the watch (pure) ---------------------------------------------------------------------------------
def test_a_counter_that_advances_is_alive_and_one_that_stands_still_for_a_lease_is_gone():
    watch = LeaderWatch()
    assert watch.observe(_elsewhere(beats=1), Here.ELSEWHERE, 0.0, LEASE) is Verdict.UNSURE  # one look tells nothing
    assert watch.observe(_elsewhere(beats=2), Here.ELSEWHERE, 1.0, LEASE) is Verdict.ALIVE
    assert watch.observe(_elsewhere(beats=2), Here.ELSEWHERE, 10.9, LEASE) is Verdict.UNSURE
    assert watch.observe(_elsewhere(beats=2), Here.ELSEWHERE, 11.0, LEASE) is Verdict.GONE
    assert watch.observe(_elsewhere(beats=3), Here.ELSEWHERE, 12.0, LEASE) is Verdict.ALIVE  # it was only slow


def test_no_record_a_released_one_or_one_dead_here_is_gone_at_once_and_our_own_alive():
    watch = LeaderWatch()
    released = _elsewhere().model_copy(update={"heartbeat_at": 0.0})
    assert watch.observe(None, Here.ELSEWHERE, 0.0, LEASE) is Verdict.GONE
    assert watch.observe(released, Here.ELSEWHERE, 0.0, LEASE) is Verdict.GONE
    assert watch.observe(_elsewhere(), Here.DEAD, 0.0, LEASE) is Verdict.GONE
    assert watch.observe(_elsewhere(), Here.THIS_PROCESS, 0.0, LEASE) is Verdict.ALIVE


def test_a_change_seen_after_a_long_gap_proves_nothing():
    watch = LeaderWatch()
    watch.observe(_elsewhere(beats=1), Here.ELSEWHERE, 0.0, LEASE)
    # Beats that happened long ago (the holder may have died since): watch again from here.
    assert watch.observe(_elsewhere(beats=9), Here.ELSEWHERE, 100.0, LEASE) is Verdict.UNSURE


# -- where a leader's process is ----------------------------------------------------------------------
def test_our_own_record_is_this_process():
    me = new_leader(time.time())
    assert me.boot_id and me.pid_ns and me.pid_start > 0
    assert where(me) is Here.THIS_PROCESS


def test_a_leader_in_another_pid_namespace_is_not_judged_dead_here():
    # Same hostname (a container), its pid unknown in our namespace: only its counter can tell.
    other = new_leader(time.time()).model_copy(update={"pid": _dead_pid(), "pid_ns": "pid:[1]"})
    assert other.hostname == socket.gethostname()
    assert where(other) is Here.ELSEWHERE and not dead_here(other)
    rebooted = new_leader(time.time()).model_copy(update={"pid": _dead_pid(), "boot_id": "an-earlier-boot"})
    assert not dead_here(rebooted)


def test_a_dead_or_reused_pid_here_is_dead_and_a_running_one_is_not():
    me = new_leader(time.time())
    assert where(me.model_copy(update={"pid": _dead_pid()})) is Here.DEAD
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from dlorch.orchestrator.leadership import _start_time

        running = me.model_copy(update={"pid": proc.pid, "pid_start": _start_time(proc.pid)})
        assert where(running) is Here.RUNNING
        reused = running.model_copy(update={"pid_start": running.pid_start - 1})  # the pid now names another process
        assert where(reused) is Here.DEAD
    finally:
        proc.kill()
        proc.wait()


# -- claims -------------------------------------------------------------------------------------------
def _ledger(tmp_path) -> Ledger:
    return Ledger(LocalDirStateStore(tmp_path / "ledger"))


def _record(ledger: Ledger, leader: Leader) -> None:
    ledger.store.put("leader", leader.model_dump_json().encode())


def test_a_live_leader_from_another_namespace_is_not_taken_over_whatever_its_clock(tmp_path):
    ledger = _ledger(tmp_path)
    far = new_leader(time.time() - 3600).model_copy(update={"id": "far", "pid": _dead_pid(), "pid_ns": "pid:[1]"})
    _record(ledger, far)  # a heartbeat an hour old by our clock, a dead pid by our namespace: neither counts
    claimant, mono = _ledger(tmp_path), time.monotonic()
    me = new_leader(time.time())
    for beat in range(1, 40):  # 39 s of our clock, the leader renewing every second
        _record(ledger, far.model_copy(update={"beats": beat}))
        assert not claimant.claim_leadership(me, LEASE, mono + beat)
    assert claimant.watch.verdict is Verdict.ALIVE and ledger.leader()[0].id == "far"


def test_a_leader_whose_counter_stands_still_for_a_lease_is_taken_over_with_a_new_term(tmp_path):
    ledger = _ledger(tmp_path)
    _record(ledger, _elsewhere(beats=5, term=3))
    me = new_leader(time.time())
    assert not ledger.claim_leadership(me, LEASE, 100.0)
    assert not ledger.claim_leadership(me, LEASE, 109.0)
    assert ledger.claim_leadership(me, LEASE, 110.0)
    assert (ledger.leader()[0].id, ledger.leader()[0].term, ledger.term) == (me.id, 4, 4)


def test_a_second_orchestrator_sees_the_counter_advance_and_is_refused(tmp_path):
    settings = Settings(store=str(tmp_path), lease_s=LEASE)
    queue = Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k"))
    first = Orchestrator(settings, _ledger(tmp_path), queue)
    first.me = first.me.model_copy(update={"boot_id": "another-machine"})  # as if on another host
    first.lead()
    second = Orchestrator(settings, _ledger(tmp_path), queue)
    import threading

    stop = threading.Event()
    renewing = threading.Thread(target=lambda: [first.maintain(time.time()) for _ in iter(lambda: stop.wait(0.3), True)])
    renewing.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(NotLeader, match="already running"):
            second.lead()
    finally:
        stop.set()
        renewing.join()
    assert time.monotonic() - t0 < 3  # a counter that moves is seen within a few renewals, not a lease


# -- fencing by term ----------------------------------------------------------------------------------
def test_a_deposed_leaders_writes_are_refused_and_its_renewal_fails(tmp_path):
    old = _ledger(tmp_path)
    old_me = _elsewhere("old", term=0)
    assert old.claim_leadership(old_me, LEASE, 0.0) and old.term == 1
    old.create(_job())
    old.put_node(_node())
    # The old leader pauses (a long GC, a suspended VM): its counter stands still, a new leader takes over.
    new = _ledger(tmp_path)
    new_me = new_leader(time.time())
    assert not new.claim_leadership(new_me, LEASE, 50.0)
    assert new.claim_leadership(new_me, LEASE, 60.0) and new.term == 2
    new.update("j-1", lambda j: j.log(2.0, "touched by the new leader"))
    new.put_node(_node())
    new.put_block_plan("j-1", {"blocks": []})
    # The old one wakes and writes before its next renewal would have told it: refused, nothing changes.
    before = {p.name: p.read_bytes() for p in (tmp_path / "ledger").rglob("*.json")}
    with pytest.raises(StaleWrite, match="newer orchestrator"):
        old.update("j-1", lambda j: j.log(3.0, "late write"))
    with pytest.raises(StaleWrite, match="newer orchestrator"):
        old.put_node(_node())
    with pytest.raises(StaleWrite, match="newer orchestrator"):
        old.put_block_plan("j-1", {"blocks": [1]})
    assert not old.renew_leadership(old_me)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ledger").rglob("*.json")} == before
    assert json.loads((tmp_path / "ledger" / "jobs" / "j-1.json").read_bytes())["term"] == 2
    assert new.block_plan("j-1") == {"blocks": []}


def test_a_deposed_orchestrator_stops_at_its_next_maintenance(tmp_path):
    settings = Settings(store=str(tmp_path), lease_s=LEASE)
    queue = Queue(f"sqlite:///{tmp_path / 'q.db'}", Signer(b"k"))
    old = Orchestrator(settings, _ledger(tmp_path), queue)
    old.lead()
    _record(old.ledger, _elsewhere("usurper", term=old.me.term + 1))
    with pytest.raises(NotLeader, match="lost orchestrator leadership"):
        old.maintain(time.time())


def test_records_of_a_lost_leader_record_stay_writable_by_the_leader_that_holds_it_now(tmp_path):
    first = _ledger(tmp_path)
    first.claim_leadership(_elsewhere("a", term=6), LEASE, 0.0)  # term 7
    first.create(_job())
    (tmp_path / "ledger" / "leader.json").unlink()  # deleted by hand: the count of terms starts again
    now = _ledger(tmp_path)
    assert now.claim_leadership(new_leader(time.time()), LEASE, 0.0) and now.term == 1
    now.update("j-1", lambda j: j.log(2.0, "still writable"))
    assert now.find("j-1").events[-1][1] == "still writable"
