"""A blockwise output belongs to one job and one split: stale planners, other jobs and their blocks leave it alone."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from dlorch.core.errors import BadInput
from tests.system.harness import Cluster
from tests.system.test_blockwise import BLOCK_VOXELS, _volume
from tests.system.test_io_guards import _one_line_error


def _files(root):
    """Every file under a zarr array, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stamp(path):
    return zarr.open_array(str(path), mode="r").attrs.get("dlorch")


def _attempt(tmp_path, job, token, block_voxels):
    """Attempt ``token`` of ``job`` as an agent runs it; ``block_voxels`` stands for the block size its node chose."""
    from dlorch.core.store import DataStore
    from dlorch.nodeagent.attempt import Attempt
    from dlorch.nodeagent.interrupts import StopFlag

    spec = job.spec.model_copy(update={"options": {"block_voxels": block_voxels}})
    return Attempt(job.model_copy(update={"spec": spec}), token, DataStore(str(tmp_path / "store")),
                   lambda body: {"ok": True}, StopFlag(), StopFlag(), tmp_path / f"work-{token}", tmp_path / "cache")


def test_a_stale_planner_leaves_a_newer_splits_done_blocks_as_they_are(tmp_path, model):
    """Planner 1 is paused past its lease; planner 2 splits the job and blocks are written; planner 1 wakes.

    A planner measures its node's speed and sizes the blocks by it, so planners on two nodes may lay
    the output out differently: the stale one here chose larger blocks, and used to recreate the
    array over the done blocks. It now touches nothing, whatever its layout.
    """
    from dlorch.core.spec import Job, JobSpec
    from dlorch.nodeagent import blockwise
    from dlorch.nodeagent.attempt import LeaseLost

    _volume(tmp_path / "in.zarr")
    out = tmp_path / "out.zarr"
    spec = JobSpec(kind="predict", image=str(tmp_path / "in.zarr"), model=str(model), output_format="zarr",
                   output=str(out))
    job = Job(id="j-fenced", spec=spec, created_at=0.0, updated_at=0.0)
    report = blockwise.split(_attempt(tmp_path, job, 2, 8192), model)
    assert _stamp(out) == {"job": "j-fenced", "split": 2} and len(report["blocks"]) > 1
    done = zarr.open_array(str(out), mode="r+")
    done[...] = np.arange(done.size, dtype=np.uint64).reshape(done.shape) % 3 + 1  # the split's blocks, written
    before = _files(out)
    assert len(before) > 2

    for block_voxels in (32768, 8192):  # another layout, and the same one
        with pytest.raises(LeaseLost, match="split 2 of job j-fenced"):
            blockwise.split(_attempt(tmp_path, job, 1, block_voxels), model)
        assert _files(out) == before

    other = job.model_copy(update={"id": "j-other"})  # another job with the same output
    with pytest.raises(BadInput) as e:
        blockwise.split(_attempt(tmp_path, other, 7, 8192), model)
    assert str(e.value) == f"output {out} holds the output of job j-fenced; choose another -o or delete it"
    assert _files(out) == before

    # The same job planned again by a newer attempt (the split report of attempt 2 was lost): its output.
    blockwise.split(_attempt(tmp_path, job, 3, 32768), model)
    assert _stamp(out) == {"job": "j-fenced", "split": 3}


def test_a_second_prediction_into_the_same_output_is_refused_in_one_line(home, tmp_path, model):
    _volume(tmp_path / "in.zarr")
    out = tmp_path / "out.zarr"
    with Cluster(tmp_path, home, DLORCH_ALLOW_URLS=str(tmp_path)) as c:  # nodes may write here (the spec file's output)
        c.agent("a1")
        first = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", str(out), "--block-voxels", BLOCK_VOXELS)
        jid = first.stdout.strip().splitlines()[-1]
        before = _files(out)
        assert _stamp(out)["job"] == jid

        second = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", str(out), "--block-voxels",
                       BLOCK_VOXELS, check=False)
        _one_line_error(second, f"output {out} holds the output of job {jid}; choose another -o or delete it")
        assert "job" not in second.stdout  # refused before it was submitted

        # A job that reaches a node anyway (submitted from a spec file, or while the first was not yet
        # planned) is refused by its planner, in the same line, and writes nothing.
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"kind": "predict", "image": str(tmp_path / "in.zarr"), "model": f"file://{model}",
                                    "output_format": "zarr", "output": str(out)}))
        third = c.cli("submit", str(spec), "--wait", check=False)
        _one_line_error(third, f"output {out} holds the output of job {jid}; choose another -o or delete it", job=True)
    assert _files(out) == before


def test_a_second_prediction_into_the_same_s3_output_is_refused_in_one_line(home, tmp_path, model, s3):
    _volume(tmp_path / "in.zarr")
    url = "s3://bucket/out.zarr"
    with Cluster(tmp_path, home, DLORCH_ALLOW_URLS="s3://bucket/", **s3) as c:  # nodes may use the bucket
        c.agent("a1")
        first = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", url, "--block-voxels", BLOCK_VOXELS)
        jid = first.stdout.strip().splitlines()[-1]
        from dlorch.core.volumes import storage_options

        written = zarr.open_array(url, mode="r", storage_options=storage_options(url))
        assert written.attrs["dlorch"]["job"] == jid
        second = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", url, "--block-voxels", BLOCK_VOXELS,
                       check=False)
        _one_line_error(second, f"output {url} holds the output of job {jid}; choose another -o or delete it")
        again = zarr.open_array(url, mode="r", storage_options=storage_options(url))
        np.testing.assert_array_equal(again[...], written[...])
        assert again.attrs["dlorch"]["job"] == jid


def test_blocks_are_not_written_into_an_output_another_job_took_over(home, tmp_path, model):
    """Between two jobs' checks, a second job's planner may recreate the output: the first job's blocks
    then find another stamp, write no further block into it, and fail their job naming the output."""
    _volume(tmp_path / "in.zarr", shape=(120, 128, 128))  # 240 blocks: seconds of work for one agent
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        jid = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", str(tmp_path / "r.zarr"),
                    "--block-voxels", BLOCK_VOXELS, "--detach").stdout.strip()
        running = c.wait_job(jid, lambda j: j["status"] == "waiting" and j["blocks"]["done"] >= 3, 120,
                             what="blocks recorded")
        output = running["output"]
        taken = zarr.open_array(output, mode="r+")
        taken.attrs["dlorch"] = {"job": "j-intruder", "split": 1}  # what the other job's planner stamps
        before = set(_files(Path(output)))
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300)
    assert len(set(_files(Path(output))) - before) <= 1  # only a block that had passed its check just before
    assert done["status"] == "failed", done.get("error")
    assert f"output {output} holds the output of job j-intruder; choose another -o or delete it" in done["error"]
    assert done["blocks"]["done"] < done["blocks"]["total"]
