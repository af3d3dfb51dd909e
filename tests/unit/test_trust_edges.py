"""Trust at the edges: ids that could name other records, the HMAC key's file mode, the node image's user."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from dlorch.core.errors import BadInput
from dlorch.core.settings import Settings
from dlorch.core.spec import Job, NodeInfo, check_id, new_job_id, parse_spec
from dlorch.orchestrator.ledger import Ledger
from dlorch.orchestrator.statestore import LocalDirStateStore

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("good", ["j-20261202-101500-a1b2c3", "local-1a2b3c", "gpu-node.lab_7", "A" * 128])
def test_safe_ids_pass(good):
    assert check_id("job", good) == good


@pytest.mark.parametrize("bad", ["../jobs/j-1", "../../escaped", "a/b", ".hidden", "..", "", "-x", "a" * 129,
                                 "a\x00b", "a b", "é", None, 7])
def test_ids_that_could_name_another_path_are_refused_with_one_line(bad):
    with pytest.raises(BadInput) as e:
        check_id("node", bad)
    assert "\n" not in str(e.value) and "invalid node id" in str(e.value)


def test_new_job_ids_are_safe():
    assert check_id("job", new_job_id())


def _node(node_id: str) -> NodeInfo:
    now = time.time()
    return NodeInfo(id=node_id, hostname="h", pid=1, cpus=2, memory_bytes=1, registered_at=now, heartbeat_at=now)


def _job(job_id: str) -> Job:
    spec = parse_spec({"kind": "predict", "image": "x.tif", "model": "m.ckpt"})
    now = time.time()
    return Job(id=job_id, spec=spec, created_at=now, updated_at=now)


def test_a_node_id_cannot_overwrite_a_job_record(tmp_path):
    ledger = Ledger(LocalDirStateStore(tmp_path / "ledger"))
    ledger.create(_job("j-1"))
    before = (tmp_path / "ledger" / "jobs" / "j-1.json").read_bytes()
    with pytest.raises(BadInput, match="invalid node id"):
        ledger.put_node(_node("../jobs/j-1"))
    assert (tmp_path / "ledger" / "jobs" / "j-1.json").read_bytes() == before
    with pytest.raises(BadInput):
        ledger.node("../jobs/j-1")


def test_a_job_id_cannot_write_outside_the_ledger(tmp_path):
    ledger = Ledger(LocalDirStateStore(tmp_path / "ledger"))
    with pytest.raises(BadInput, match="invalid job id"):
        ledger.create(_job("../../escaped"))
    for bad in ("../../escaped", "../nodes/x"):
        with pytest.raises(BadInput):
            ledger.find(bad)
        with pytest.raises(BadInput):
            ledger.resolve(bad)
        with pytest.raises(BadInput):
            ledger.put_block_plan(bad, {})
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))


def test_the_secret_key_is_made_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("DLORCH_SECRET", raising=False)
    s = Settings(store=str(tmp_path / "home"), secret="")
    key = s.resolved_secret()
    f = tmp_path / "home" / "secret.key"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert s.resolved_secret() == key


def test_a_key_left_readable_by_others_is_tightened(tmp_path, monkeypatch):
    monkeypatch.delenv("DLORCH_SECRET", raising=False)
    (tmp_path / "home").mkdir()
    f = tmp_path / "home" / "secret.key"
    f.write_bytes(b"00ff" * 16)
    os.chmod(f, 0o644)
    assert Settings(store=str(tmp_path / "home"), secret="").resolved_secret() == b"00ff" * 16
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_the_node_image_runs_the_agent_unprivileged():
    lines = [ln.strip() for ln in (REPO / "Dockerfile.node").read_text().splitlines()]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    entry = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRYPOINT"))
    last_user = max(i for i, ln in enumerate(lines) if ln.startswith("USER "))
    assert users and users[-1] not in ("root", "0") and last_user < entry
