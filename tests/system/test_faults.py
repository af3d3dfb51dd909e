"""Nothing lost: zombies fenced off, corrupt checkpoints skipped, crashing jobs failed, Redis restarts survived."""

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from tests.conftest import free_port, synthetic_pair
from tests.system.harness import Cluster, wait_for


def _ckpts(home: Path, jid: str, token: int) -> list[str]:
    return sorted(p.name for p in (home / "jobs" / jid / "attempts" / str(token) / "ckpt").glob("*.ckpt"))


def test_sigstopped_zombie_writes_nothing_and_stops(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        zombie = c.agent("zombie")
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "8")
        c.wait_job(jid, lambda j: j["epochs_done"] >= 1, what="first epoch")
        zombie.send_signal(signal.SIGSTOP)
        frozen = c.wait_job(jid, lambda j: j["status"] == "queued", 60, what="lease expiry")
        assert frozen["attempts"][0]["outcome"] == "expired"
        c.agent("healthy")
        c.wait_job(jid, lambda j: j["status"] == "running" and j["attempts"][-1]["node"] == "healthy", 90)
        before = c.job(jid)
        zombie.send_signal(signal.SIGCONT)
        # It learns at its next heartbeat and abandons the epoch at the next batch end (its checkpoint could
        # never be accepted); a batch now shares the 2 cores with the healthy node's training.
        wait_for(lambda: "lost" in c.node_log("zombie"), 180, what="the zombie to learn it lost the lease")
        done = c.wait_job(jid, lambda j: j["status"] == "succeeded", 300, what="completion on the healthy node")
        first = done["attempts"][0]
        assert first == before["attempts"][0]  # nothing of the zombie's was accepted after expiry
        assert done["epochs_done"] == 8 and done["attempts"][-1]["node"] == "healthy"
        assert all(f"/attempts/{len(done['attempts'])}/" in done[k] for k in ("checkpoint", "model", "output"))
        assert zombie.poll() is None  # it stopped the job, not itself: it is an agent again


def test_truncated_latest_checkpoint_resumes_from_the_one_before(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        first = c.agent("first")
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "4")
        j = c.wait_job(jid, lambda j: j["epochs_done"] >= 2, what="two epochs")
        first.send_signal(signal.SIGKILL)
        first.wait()
        j = c.job(jid)
        latest = Path(j["checkpoint"])
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # a partial object
        c.agent("second")
        done = c.wait_job(jid, lambda j: j["status"] == "succeeded", 300, what="completion")
        second = done["attempts"][-1]
        assert second["epochs_start"] == j["epochs_done"] - 1
        assert second["resumed_from"] == j["checkpoints"][-2][1]
        assert done["epochs_done"] == 4
        assert "unusable" in c.cli("logs", jid).stdout


def test_a_job_that_always_raises_fails_after_the_retry_limit(home, tmp_path):
    img, _ = synthetic_pair(tmp_path)
    import torch

    # A loadable checkpoint of another program, already in the store: the CLI checks the models it
    # uploads (a user's file would be refused at once), not what the store holds; the engine raises on it, always.
    bad = home / "blobs" / "foreign.ckpt"
    bad.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": 0}, bad)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "predict", "image": str(img), "model": str(bad)}))
    with Cluster(tmp_path, home, DLORCH_MAX_ATTEMPTS="3") as c:
        c.agent("a1")
        jid = c.cli("submit", str(spec)).stdout.strip().splitlines()[-1]
        done = c.wait_job(jid, lambda j: j["status"] == "failed", 120, what="failure")
        assert [a["outcome"] for a in done["attempts"]] == ["errored"] * 3
        status = c.cli("status", jid).stdout
        assert "failed" in status and done["error"].split(":")[0] in status
        assert c.agents["a1"].poll() is None  # the agent survived all three


def test_redis_killed_and_restarted_empty_loses_no_job(redis_server, home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home, DLORCH_QUEUE=redis_server.url) as c:
        ids = [c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / f"{i}.tif"),
                        "--epochs", "2") for i in range(4)]
        c.agent("a1")
        c.agent("a2")
        c.wait_job(ids[0], lambda j: j["status"] == "running", 90)
        redis_server.kill()
        time.sleep(2)
        redis_server.start()  # same port, empty
        for jid in ids:
            assert c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 400)["status"] == "succeeded"


class _IMDS(BaseHTTPRequestHandler):
    notice: bytes | None = None

    def do_PUT(self):
        self._send(200, b"token-123")

    def do_GET(self):
        ok = self.headers.get("X-aws-ec2-metadata-token") == "token-123"
        if not ok:
            self._send(401, b"")
        elif self.path.endswith("/spot/instance-action") and _IMDS.notice:
            self._send(200, _IMDS.notice)
        else:
            self._send(404, b"")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_spot_interruption_notice_hands_the_job_back(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _IMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Cluster(tmp_path, home) as c:
            spot = c.agent("spot", "--spot-notices", f"http://127.0.0.1:{server.server_port}")
            jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "6")
            c.wait_job(jid, lambda j: j["epochs_done"] >= 1)
            _IMDS.notice = b'{"action": "terminate", "time": "2026-11-25T12:00:00Z"}'
            assert spot.wait(timeout=120) == 0
            j = c.job(jid)
            assert j["status"] == "queued" and j["attempts"][0]["outcome"] == "handed_back"
            assert "spot interruption" in c.node_log("spot")
    finally:
        server.shutdown()
        _IMDS.notice = None


def test_drain_through_the_ledger_hands_back_and_exits(home, tmp_path):
    """The portable stop: no signal, just `dlorch nodes drain NODE`."""
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        node = c.agent("lab-pc")
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "6")
        c.wait_job(jid, lambda j: j["epochs_done"] >= 1)
        assert "draining lab-pc" in c.cli("nodes", "drain", "lab-pc").stdout
        assert node.wait(timeout=120) == 0
        j = c.job(jid)
        assert j["status"] == "queued" and j["attempts"][0]["outcome"] == "handed_back"
        assert j["epochs_done"] >= 1 and j["checkpoint"]
        nodes = c.cli("nodes", "--json", "--all").stdout
        assert '"state": "gone"' in nodes
