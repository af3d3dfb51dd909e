"""Outputs never destroy what is already there; unreadable inputs and damaged copies are named in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from dlorch.core.errors import BadInput
from tests.conftest import synthetic_pair
from tests.system.harness import Cluster, cli_env, dlorch


def _volume(path, shape=(6, 128, 128)):
    rng = np.random.default_rng(3)
    a = (rng.random(shape) * 80).astype(np.uint8)
    a[:, 20:70, 30:90] += 120
    zarr.create_array(str(path), shape=shape, chunks=(1, 64, 64), dtype="uint8")[...] = a
    return a


def _precious_dir(path):
    path.mkdir(parents=True)
    (path / "precious.txt").write_text("precious")
    return path


def _one_line_error(cp, *needles, job: bool = False):
    """The command failed with one ``error:`` line; a job's run prints its id and progress before it."""
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp.stderr
    assert lines[-1].startswith("error: ") and (job or len(lines) == 1), cp.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


# -- outputs -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir("/proc/self") or os.geteuid() != 0,
                    reason="needs Linux's /proc and root (for others os.access already says no)")
def test_a_directory_that_says_writable_but_is_not_is_refused_before_a_job(home, tmp_path):
    """/proc passes os.access for root (as an NFS export that squashes root does) but takes no new file:
    the output is tried before the job is queued, not after it has trained."""
    from dlorch.core.imageio import check_output_path

    with pytest.raises(BadInput, match=r"cannot write /proc/dlorch-nope/o\.tif: creating a file in /proc failed"):
        check_output_path("/proc/dlorch-nope/o.tif")
    img, _ = synthetic_pair(tmp_path)
    cp = dlorch("denoise", str(img), "-o", "/proc/dlorch-nope/o.tif", env=cli_env(), check=False)
    assert cp.returncode != 0 and "job" not in cp.stdout + cp.stderr, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write /proc/dlorch-nope/o.tif: creating a file in /proc"), lines
    assert lines[0].endswith("choose another path"), lines


def test_blockwise_prediction_into_a_plain_directory_or_onto_its_input_changes_neither(home, tmp_path, model):
    vol = _volume(tmp_path / "self.zarr")
    data = _precious_dir(tmp_path / "data2.zarr")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "predict", "image": str(tmp_path / "self.zarr"), "model": f"file://{model}",
                                "output_format": "zarr", "output": str(data)}))
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        cp = c.cli("submit", str(spec), "--wait", check=False)
        _one_line_error(cp, f"output {data} exists and is not a zarr array; remove it or choose another path", job=True)
        url = f"file://{tmp_path}/self.zarr"
        cp = c.cli("predict", str(model), url, "-o", url, "--block-voxels", "8192", check=False)
        _one_line_error(cp, f"the output {url} is the input; choose another path", job=True)
    assert (data / "precious.txt").read_text() == "precious" and len(list(data.iterdir())) == 1
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "self.zarr"), mode="r")[...], vol)


# -- unreadable inputs ---------------------------------------------------------------------------------
def test_a_text_or_object_npy_is_not_an_array_of_numbers_and_no_pickle_is_suggested(home, tmp_path):
    from dlorch.core.imageio import read_image

    img, lab = synthetic_pair(tmp_path)
    (tmp_path / "text.npy").write_text("hello\n")
    np.save(tmp_path / "obj.npy", np.array([1, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objs.npz", labels=np.array([1, None], dtype=object))
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    line = _one_line_error(dlorch("segment", str(tmp_path / "text.npy"), "--labels", str(lab), "-o",
                                  str(tmp_path / "o.tif"), env=cli_env(), check=False),
                           "text.npy is not a NumPy array file of numbers")
    assert "allow_pickle" not in line
    for bad, message in (("obj.npy", "obj.npy is not a NumPy array file of numbers"),
                         ("objs.npz", "objs.npz:labels is not a NumPy array file of numbers"),
                         ("words.npy", "words.npy holds <U1 values, not numbers")):
        with pytest.raises(BadInput, match=message) as e:
            read_image(tmp_path / bad, role="labels")
        assert "allow_pickle" not in str(e.value)


def test_a_corrupt_chunk_sampled_by_the_split_names_the_volume_and_region(home, tmp_path, model):
    _volume(tmp_path / "in.zarr")  # 6 slices: the split samples every one for the statistics
    (tmp_path / "in.zarr" / "c" / "3" / "0" / "0").write_bytes(b"garbage, not a compressed chunk")
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        cp = c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", str(tmp_path / "o.zarr"),
                   "--block-voxels", "8192", check=False)
    line = _one_line_error(cp, "cannot read ", ".zarr (region z 3:4): ", "rewrite the damaged chunk", job=True)
    assert "RuntimeError" not in line


# -- the node's cache ----------------------------------------------------------------------------------
def test_a_truncated_cached_model_is_fetched_again(home, tmp_path, model):
    img, _ = synthetic_pair(tmp_path)
    env = cli_env()
    dlorch("predict", str(model), str(img), "-o", str(tmp_path / "first.npy"), env=env)
    cached = [p for p in home.rglob("*.ckpt") if p.parent.name == "cache"]
    assert len(cached) == 1
    cached[0].write_bytes(cached[0].read_bytes()[:100_000])
    dlorch("predict", str(model), str(img), "-o", str(tmp_path / "again.npy"), env=env)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "first.npy"))
    assert cached[0].read_bytes() == model.read_bytes()


def test_segment_refuses_an_output_that_would_destroy_a_folder_before_it_trains(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    folder = tmp_path / "data.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    cp = dlorch("segment", str(img), "--labels", str(lab), "-o", str(folder), "--epochs", "1", check=False)
    assert cp.returncode != 0 and "exists and is not a zarr array" in cp.stderr and "Traceback" not in cp.stderr
    assert (folder / "precious.txt").read_text() == "keep me"
    assert not (home / "ledger" / "jobs").exists() or not list((home / "ledger" / "jobs").glob("*.json"))
    cp = dlorch("segment", str(img), "--labels", str(lab), "-o", str(lab), check=False)
    assert cp.returncode != 0 and "is the input" in cp.stderr


def test_train_copies_the_model_only_to_a_ckpt_file(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    (tmp_path / "m.ckpt").mkdir()
    cp = dlorch("train", "segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "m.ckpt"), check=False)
    assert cp.returncode != 0 and "is a directory" in cp.stderr and (tmp_path / "m.ckpt").is_dir()
    cp = dlorch("train", "segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "m.pt"), check=False)
    assert cp.returncode != 0 and "ending in .ckpt" in cp.stderr


def test_input_urls_are_checked_where_they_are_before_a_job_is_queued(s3):
    import boto3

    from dlorch.core.volumes import check_url

    boto3.client("s3").put_object(Bucket="bucket", Key="image.npy", Body=b"\x93NUMPY")
    check_url("s3://bucket/image.npy", "image")  # there: no error
    for url in ("s3://bucket/never-written.npy", "s3://no-such-bucket/image.npy", "s3://bucket/"):
        with pytest.raises(BadInput, match="does not exist"):
            check_url(url, "image")
    # (moto's buckets live as long as the test process: names no other test writes)
    with pytest.raises(BadInput, match="no zarr volume at s3://bucket/never-written.zarr"):
        check_url("s3://bucket/never-written.zarr", "image")
    # No credentials anywhere (a fresh process: s3fs keeps its filesystems per process).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true"}
    code = "from dlorch.core.volumes import check_url\ncheck_url('s3://bucket/image.npy', 'image')"
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "BadInput: no credentials for s3://bucket/image.npy" in cp.stderr, cp.stderr
