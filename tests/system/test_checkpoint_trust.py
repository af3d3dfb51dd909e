"""A checkpoint planted in the store or given to the CLI runs no code: resume, predict jobs and `dlorch predict`."""

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import code_checkpoint, synthetic_pair
from tests.system.harness import Cluster, cli_env, dlorch


def test_a_resume_checkpoint_that_would_run_code_is_refused_and_the_one_before_resumes(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    marker = tmp_path / "ran"
    with Cluster(tmp_path, home) as c:
        first = c.agent("first")
        jid = c.submit("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "4")
        c.wait_job(jid, lambda j: j["epochs_done"] >= 2, what="two epochs")
        first.send_signal(signal.SIGKILL)
        first.wait()
        j = c.job(jid)
        latest = Path(j["checkpoint"])
        code_checkpoint(latest, marker, base=latest)  # a valid checkpoint, plus one object that runs code
        c.agent("second")
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300, what="the job to end")
        assert not marker.exists(), "resuming the job ran code from its checkpoint"
        assert done["status"] == "succeeded" and done["epochs_done"] == 4
        second = done["attempts"][-1]
        assert second["resumed_from"] == j["checkpoints"][-2][1] and second["epochs_start"] == j["epochs_done"] - 1
        refusals = [ln for ln in c.cli("logs", jid).stdout.splitlines() if "refused" in ln]
        assert len(refusals) == 1 and latest.name in refusals[0] and "never runs code" in refusals[0]
        assert "Traceback" not in c.node_log("second")


def test_a_stored_model_that_would_run_code_fails_its_predict_job_at_once_in_one_line(home, tmp_path, model):
    img, _ = synthetic_pair(tmp_path)
    marker = tmp_path / "ran"
    # Already in the store, where the CLI's check of the files it uploads does not look.
    evil = home / "blobs" / "evil.ckpt"
    evil.parent.mkdir(parents=True, exist_ok=True)
    code_checkpoint(evil, marker, base=model)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "predict", "image": str(img), "model": str(evil)}))
    with Cluster(tmp_path, home, DLORCH_MAX_ATTEMPTS="3") as c:
        jid = c.cli("submit", str(spec)).stdout.strip().splitlines()[-1]
        c.agent("a1")
        done = c.wait_job(jid, lambda j: j["status"] == "failed", 120, what="failure")
        assert not marker.exists(), "predicting with the model ran code from it"
        assert [a["outcome"] for a in done["attempts"]] == ["errored"]  # refused for good: no retry elsewhere
        assert "refused" in done["error"] and "never runs code" in done["error"] and "\n" not in done["error"]
        assert "Traceback" not in c.node_log("a1")
        assert c.agents["a1"].poll() is None  # the agent lives on


@pytest.mark.parametrize("raw", [False, True], ids=["torch-save", "bare-pickle"])
def test_dlorch_predict_refuses_a_model_that_would_run_code_in_one_line(home, tmp_path, model, raw):
    img, _ = synthetic_pair(tmp_path)
    marker = tmp_path / "ran"
    evil = code_checkpoint(tmp_path / "evil.ckpt", marker, base=model, raw=raw)
    cp = dlorch("predict", str(evil), str(img), "-o", str(tmp_path / "p.tif"), env=cli_env(), check=False)
    assert not marker.exists(), "dlorch predict ran code from the model"
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode != 0 and len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert str(evil) in lines[0] and "refused" in lines[0] and "never runs code" in lines[0]
    assert not (tmp_path / "p.tif").exists()
