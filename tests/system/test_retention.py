"""`dlorch gc` deletes superseded and ended checkpoints, and nothing a resume or `dlorch predict` needs."""

import signal
from pathlib import Path

from tests.conftest import synthetic_pair
from tests.system.harness import Cluster


def _checkpoints(home: Path, jid: str) -> set[str]:
    return {str(p) for p in (home / "jobs" / jid / "attempts").glob("*/ckpt/epoch-*.ckpt")}


def test_gc_keeps_what_resume_and_predict_need_and_deletes_the_rest(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home) as c:
        first = c.agent("a1")
        jid = c.submit("train", "segment", str(img), "--labels", str(lab), "--epochs", "16")
        c.wait_job(jid, lambda j: j["epochs_done"] >= 7, what="seven epochs")
        first.send_signal(signal.SIGKILL)
        first.wait()
        queued = c.wait_job(jid, lambda j: j["status"] == "queued", 60, what="the lease to expire")
        accepted = {uri for _, uri in queued["checkpoints"]}
        stored = _checkpoints(home, jid)
        assert accepted < stored and len(accepted) == 5, (accepted, stored)

        dry = c.cli("gc", "--dry-run")
        assert _checkpoints(home, jid) == stored and "would delete" in dry.stderr
        listed = {line.split("\t")[0] for line in dry.stdout.splitlines()}
        c.cli("gc")
        assert _checkpoints(home, jid) == accepted  # the superseded ones went; every fallback stayed
        assert {str(home / k) for k in listed} == stored - accepted

        c.agent("a2")
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300)
        assert done["status"] == "succeeded", done.get("error")
        assert done["attempts"][-1]["epochs_start"] == queued["epochs_done"]  # resumed where it was, not from 0
        c.cli("gc", "--older-than", "1")  # it ended just now: spared
        assert _checkpoints(home, jid)
        c.cli("gc")
        assert not _checkpoints(home, jid) and Path(done["model"]).is_file()
        c.cli("predict", jid, str(img), "-o", str(tmp_path / "seg.tif"))  # the model is all predict needs
        assert (tmp_path / "seg.tif").is_file()
