"""Leadership between real processes: a client with a skewed clock, a second `dlorch up`, a leader lost elsewhere."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import Cluster, cli_env, dlorch, spawn, wait_for


def _faketime(offset: str) -> dict[str, str]:
    """Variables that run a process with its clocks (wall and monotonic) moved by ``offset`` (libfaketime)."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime is not installed: apt-get install -y faketime (`make test` does it)")
    return {"LD_PRELOAD": libs[0], "FAKETIME": offset}


def _leader(home: Path) -> dict:
    return json.loads((home / "ledger" / "leader.json").read_text())


def _far_leader(home: Path, term: int) -> dict:
    """A leader record as an orchestrator on another machine writes it, its heartbeat just renewed."""
    record = {"id": "far-away", "hostname": "far-host", "pid": 4242, "started_at": time.time(),
              "heartbeat_at": time.time(), "term": term, "beats": 17, "boot_id": "another-machine",
              "pid_ns": "pid:[4026531836]", "pid_start": 99}
    (home / "ledger").mkdir(parents=True, exist_ok=True)
    (home / "ledger" / "leader.json").write_text(json.dumps(record))
    return record


LOCAL_SERVICE = """
from dlorch.core.settings import Settings
from dlorch.orchestrator.client import Client, local_service
with local_service(Client(Settings())) as service:
    print("orchestrator:", service is not None and service.orch is not None)
"""


def test_a_client_whose_clock_runs_an_hour_ahead_deposes_nobody(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        time.sleep(1.5)  # renewed at least once
        leader = _leader(home)
        ahead = {**c.env, **_faketime("+1h")}
        their_time = float(subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env=ahead,
                                          capture_output=True, text=True, check=True).stdout)
        assert their_time - time.time() > 3500  # the client's clock is indeed an hour ahead
        jid = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "p.tif"), "--detach",
                     env=ahead).stdout.strip()
        dlorch("cancel", jid, env=ahead)
        # What `dlorch segment` without --detach does first: start an orchestrator if it judges none alive.
        started = subprocess.run([sys.executable, "-c", LOCAL_SERVICE], env=ahead, capture_output=True, text=True,
                                 timeout=120)
        time.sleep(2)  # a deposed `dlorch up` exits at its next renewal, within a second
        assert c.service.poll() is None, (tmp_path / "up.log").read_text()
        assert started.stdout.split() == ["orchestrator:", "False"], started.stderr
        now = _leader(home)
        assert (now["id"], now.get("term")) == (leader["id"], leader.get("term"))
        assert now.get("beats", 0) > leader.get("beats", 0)  # still renewing
        assert c.job(jid)["status"] == "cancelled"


def test_a_second_up_beside_a_live_one_exits_at_once_with_one_line(home, tmp_path):
    with Cluster(tmp_path, home) as c:
        leader = _leader(home)
        t0 = time.monotonic()
        cp = c.cli("up", check=False)
        assert time.monotonic() - t0 < 15  # the live counter is seen within a second or two, not after a lease
        lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
        assert cp.returncode != 0 and len(lines) == 1 and "already running" in lines[0], cp.stderr
        assert c.service.poll() is None and _leader(home)["id"] == leader["id"]


def test_a_leader_lost_on_another_machine_is_taken_over_after_one_lease(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    env = cli_env(DLORCH_LEASE_S="5")
    _far_leader(home, term=4)
    # A client finds nobody answering and the counter standing still: after a lease it orchestrates the one request.
    t0 = time.monotonic()
    jid = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--detach",
                 env=env, timeout=60).stdout.strip()
    assert 4.5 <= time.monotonic() - t0 < 40
    assert json.loads((home / "ledger" / "jobs" / f"{jid}.json").read_text())["status"] == "queued"
    # `dlorch up` does the same: it waits out one lease of silence, then leads in the next term.
    _far_leader(home, term=9)
    t0 = time.monotonic()
    up = spawn("up", env=env, log=tmp_path / "up.log")
    try:
        taken = wait_for(lambda: (r := _leader(home))["id"] != "far-away" and r, 60, 0.1, what="a takeover")
        assert time.monotonic() - t0 >= 4.5 and taken["term"] == 10 and taken["pid"] == up.pid
        assert up.poll() is None
    finally:
        up.terminate()
        up.wait(timeout=60)
