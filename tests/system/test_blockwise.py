"""Blockwise prediction of zarr volumes by many agents: identical bytes whatever the agents, kills and storage."""

import json
import signal

import numpy as np
import pytest
import zarr

from tests.conftest import free_port, synthetic_pair
from tests.system.harness import Cluster, cli_env, dlorch

BLOCK_VOXELS = "8192"


def _volume(path, shape=(6, 128, 128), chunks=(1, 64, 64)):
    rng = np.random.default_rng(3)
    a = (rng.random(shape) * 80).astype(np.uint8)
    a[:, 20:70, 30:90] += 120
    z = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint8")
    z[...] = a
    return a


def _predict(c, model, src, dst, *extra):
    return c.cli("predict", str(model), str(src), "-o", str(dst), "--block-voxels", BLOCK_VOXELS, *extra)


def test_one_agent_three_agents_and_kills_give_identical_bytes(home, tmp_path, model):
    _volume(tmp_path / "in.zarr")
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        _predict(c, model, tmp_path / "in.zarr", tmp_path / "one.zarr")
        c.agent("a2")
        c.agent("a3")
        jid = _predict(c, model, tmp_path / "in.zarr", tmp_path / "three.zarr").stdout.strip().splitlines()[-1]
        three = c.job(jid)
        assert three["blocks"]["done"] == three["blocks"]["total"] >= 12
        assert len(three["blocks"]["by_node"]) >= 2  # the work was shared
        status = c.cli("status", jid).stdout
        assert "blocks" in status and "Mvox/s" in status

        killed = _predict(c, model, tmp_path / "in.zarr", tmp_path / "k.zarr", "--detach").stdout.strip()
        c.wait_job(killed, lambda j: (j.get("blocks") or {}).get("done", 0) >= 2, 120, what="blocks under way")
        victim = next(n for n, p in c.agents.items() if p.poll() is None)
        c.agents[victim].send_signal(signal.SIGKILL)
        c.agents[victim].wait()
        c.agent(victim)
        done = c.wait_job(killed, lambda j: j["status"] in ("succeeded", "failed"), 300)
        assert done["status"] == "succeeded"
        one = zarr.open_array(str(tmp_path / "one.zarr"), mode="r")[...]
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "three.zarr"), mode="r")[...], one)
        np.testing.assert_array_equal(zarr.open_array(done["output"], mode="r")[...], one)
        assert set(np.unique(one)) <= {1, 2} and one.shape == (6, 128, 128)


def test_a_block_that_cannot_be_read_fails_the_job_after_retries(home, tmp_path, model):
    # 40 slices: the split samples 16 of them for the intensity statistics, not slice 1, whose chunk
    # is corrupt; so the split succeeds and the block holding slice 1 cannot be read.
    _volume(tmp_path / "in.zarr", shape=(40, 128, 128))
    (tmp_path / "in.zarr" / "c" / "1" / "0" / "0").write_bytes(b"garbage, not a compressed chunk")
    with Cluster(tmp_path, home, DLORCH_MAX_ATTEMPTS="2") as c:
        c.agent("a1")
        c.agent("a2")
        jid = _predict(c, model, tmp_path / "in.zarr", tmp_path / "o.zarr", "--detach").stdout.strip()
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300)
        assert done["status"] == "failed" and done["error"].startswith("block "), done.get("error")
        assert "reading" in done["error"]
        assert max(done["blocks"]["errors"].values()) == 2  # tried twice (MAX_ATTEMPTS), then failed
        assert done["blocks"]["done"] < done["blocks"]["total"]
        status = c.cli("status", jid).stdout
        assert "failed" in status and "block " in status
    assert not (tmp_path / "o.zarr").exists()  # no partial output declared done


def test_s3_volume_predicted_by_two_agents_into_s3(home, tmp_path, model, s3):
    from dlorch.core.volumes import storage_options

    local = _volume(tmp_path / "in.zarr")
    z = zarr.create_array("s3://bucket/in.zarr", shape=local.shape, chunks=(1, 64, 64), dtype="uint8",
                          storage_options=storage_options("s3://bucket/in.zarr"))
    z[...] = local
    with Cluster(tmp_path, home, DLORCH_ALLOW_URLS="s3://bucket/", **s3) as c:  # nodes may use the bucket
        c.agent("a1")
        c.agent("a2")
        _predict(c, model, "s3://bucket/in.zarr", "s3://bucket/out.zarr")
        out = zarr.open_array("s3://bucket/out.zarr", mode="r", storage_options=storage_options("s3://"))[...]
        _predict(c, model, tmp_path / "in.zarr", tmp_path / "local.zarr")
        np.testing.assert_array_equal(out, zarr.open_array(str(tmp_path / "local.zarr"), mode="r")[...])
        bad = c.cli("predict", str(model), "s3://no-such-bucket/in.zarr", "-o", "s3://bucket/x.zarr", check=False)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
        assert "no-such-bucket" in bad.stderr and "Traceback" not in bad.stderr


def test_an_unreachable_s3_endpoint_is_one_line(home, model):
    # Nothing listens on the port: the read fails, and zarr's abandoned sibling reads must not print
    # their "Exception ignored" tracebacks after the one-line error (they do when no region is set).
    env = cli_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    env.pop("AWS_DEFAULT_REGION", None)
    env.pop("AWS_REGION", None)
    cp = dlorch("predict", str(model), "s3://bucket/in.zarr", "-o", "s3://bucket/out.zarr", env=env, check=False)
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode != 0 and len(lines) == 1, cp.stderr
    assert "cannot reach s3://bucket/" in lines[0] and "endpoint" in lines[0]


def test_orchestrator_killed_mid_job_resumes_blocks_from_the_ledger(home, tmp_path, model):
    # 128 blocks: seconds of work for one agent (~16 blocks/s at load 8 on 2 cores), most of them still to
    # do when the kill lands (asserted below); the reference pass predicts them all again
    _volume(tmp_path / "in.zarr", shape=(64, 128, 128))
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        jid = _predict(c, model, tmp_path / "in.zarr", tmp_path / "r.zarr", "--detach").stdout.strip()
        c.wait_job(jid, lambda j: j["status"] == "waiting" and j["blocks"]["done"] >= 3, 120, what="blocks recorded")
        c.service.send_signal(signal.SIGKILL)  # block leases and the last second of done marks are lost
        c.service.wait()
        at_kill = c.job(jid)["blocks"]
        assert at_kill["done"] < at_kill["total"]  # blocks were left for the next orchestrator to resume
        c.up()
        done = c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed"), 300)
        assert done["status"] == "succeeded" and done["blocks"]["done"] == done["blocks"]["total"]
        ref = _predict(c, model, tmp_path / "in.zarr", tmp_path / "ref.zarr")
        assert ref.returncode == 0
        np.testing.assert_array_equal(zarr.open_array(done["output"], mode="r")[...],
                                      zarr.open_array(str(tmp_path / "ref.zarr"), mode="r")[...])


def test_a_3d_model_predicts_blockwise_with_a_z_halo_and_identical_bytes(home, tmp_path):
    from dlorch.core.engine.hooks import NoHooks
    from dlorch.core.engine.segment.intensity import IntensityStats
    from dlorch.core.engine.segment import (plan_segmentation, predict_probabilities, predict_segmentation,
                                            train_segmentation)
    from tests.engine.test_predict import _balls

    image, strokes, _ = _balls()
    plan = plan_segmentation(image, strokes, epochs=1)
    assert plan.spatial_dims == 3
    plan = plan.model_copy(update={"steps_per_epoch": 20, "filters": [8, 16, 32], "batch_size": 2})
    ckpt = train_segmentation(image, strokes, plan, workdir=tmp_path / "w", resume_from=None, hooks=NoHooks()).checkpoint
    src = zarr.create_array(str(tmp_path / "vol.zarr"), shape=image.shape, chunks=(8, 24, 24), dtype="float32")
    src[...] = image
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        jid = _predict(c, ckpt, tmp_path / "vol.zarr", tmp_path / "one.zarr").stdout.strip().splitlines()[-1]
        assert c.job(jid)["blocks"]["total"] >= 8  # blocks cut along Z as well
        c.agent("a2")
        _predict(c, ckpt, tmp_path / "vol.zarr", tmp_path / "two.zarr")
    one = zarr.open_array(str(tmp_path / "one.zarr"), mode="r")[...]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "two.zarr"), mode="r")[...], one)
    # Each block runs the whole volume's windows over its core, along Z too, so the blocks make up
    # exactly one single-node pass with the job's normalisation and priors (recorded in its plan).
    plan_record = json.loads((home / "ledger" / "blockplans" / f"{jid}.json").read_bytes())
    single = predict_probabilities(ckpt, image, stats=IntensityStats.model_validate(plan_record["norm"]),
                                   priors=np.asarray(plan_record["priors"]))
    np.testing.assert_array_equal(one, single.argmax(0) + 1)
    assert (one == predict_segmentation(ckpt, image)).mean() > 0.95  # the volume's own statistics: nearly so


def test_a_denoising_model_predicts_blockwise_into_float32_like_one_pass(home, tmp_path, monkeypatch):
    from dlorch.core.engine.denoise import NoHooks, train_denoising
    from dlorch.core.engine.denoise.predict import denoise_with_details
    from tests.engine.test_denoise import fast_plan, make_noisy

    noisy, clean = make_noisy((6, 64, 64), sigma=0.4, offset=-50.0, seed=1)
    plan = fast_plan(noisy, epochs=1, steps=20, batch_size=8, infer_roi=[64, 64])
    ckpt = train_denoising(noisy, None, plan, workdir=tmp_path / "w", resume_from=None, hooks=NoHooks()).checkpoint
    image = np.tile(noisy, (1, 2, 2))  # (6, 128, 128): several windows per slice, blocks of 64x64
    src = zarr.create_array(str(tmp_path / "noisy.zarr"), shape=image.shape, chunks=(1, 64, 64), dtype="float32")
    src[...] = image
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        c.agent("a2")
        jid = _predict(c, ckpt, tmp_path / "noisy.zarr", tmp_path / "den.zarr").stdout.strip().splitlines()[-1]
        job = c.job(jid)
        assert job["blocks"]["done"] == job["blocks"]["total"] >= 8
    out = zarr.open_array(str(tmp_path / "den.zarr"), mode="r")
    assert out.dtype == np.float32 and out.shape == image.shape
    # The blocks make up one whole pass, posterior step included, at the noise level the split measured.
    record = json.loads((home / "ledger" / "blockplans" / f"{jid}.json").read_bytes())
    assert record["noise_var"] > 0
    monkeypatch.setenv("DLORCH_THREADS", "1")  # as the agents ran: a CPU convolution's rounding follows its threads
    single = denoise_with_details(ckpt, image, noise_var=record["noise_var"]).image
    np.testing.assert_array_equal(out[...], single)
    assert np.abs(out[...] - np.tile(clean, (1, 2, 2))).mean() < np.abs(image - np.tile(clean, (1, 2, 2))).mean()
