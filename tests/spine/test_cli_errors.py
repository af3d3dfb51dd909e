"""Bad input exits non-zero with one line that names the problem: never a traceback, never lost data."""

import json

import numpy as np
import pytest

from tests.conftest import cli_env, dlorch, synthetic_pair


def _one_line_error(cp, *needles):
    assert cp.returncode != 0, cp.stdout
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def env(home):
    return cli_env()


def test_missing_image(env, tmp_path):
    _one_line_error(dlorch("segment", str(tmp_path / "nope.tif"), "--labels", "x.npy", "-o",
                           str(tmp_path / "o.tif"), env=env, check=False), "not found", "nope.tif")


def test_labels_of_another_shape(env, tmp_path):
    img, _ = synthetic_pair(tmp_path)
    np.save(tmp_path / "small.npy", np.zeros((2, 32, 32), np.uint8))
    _one_line_error(dlorch("segment", str(img), "--labels", str(tmp_path / "small.npy"), "-o",
                           str(tmp_path / "o.tif"), env=env, check=False), "labels shape (2, 32, 32)", "(2, 64, 64)")


def test_unpainted_labels_fail_before_a_job_is_queued(env, tmp_path):
    img, _ = synthetic_pair(tmp_path)
    np.save(tmp_path / "empty.npy", np.zeros((2, 64, 64), np.uint8))
    cp = dlorch("segment", str(img), "--labels", str(tmp_path / "empty.npy"), "-o", str(tmp_path / "o.tif"),
                env=env, check=False)
    _one_line_error(cp, "no labelled pixels", "paint strokes")
    assert "job" not in cp.stdout  # refused at submission: nothing was uploaded or queued
    one_class = np.zeros((2, 64, 64), np.uint8)
    one_class[0, :4, :4] = 1
    np.save(tmp_path / "one.npy", one_class)
    _one_line_error(dlorch("train", "segment", str(img), "--labels", str(tmp_path / "one.npy"), env=env, check=False),
                    "only class 1")


def test_spec_with_unknown_field(env, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "segment", "image": str(img), "labels": str(lab), "epochz": 3}))
    _one_line_error(dlorch("submit", str(spec), env=env, check=False), "field 'epochz'")


def test_unreachable_redis(env):
    _one_line_error(dlorch("--queue", "redis://127.0.0.1:1/0", "jobs", env=env, check=False),
                    "cannot reach queue redis://127.0.0.1:1/0")


def test_unknown_job_and_bad_output_suffix(env, tmp_path):
    _one_line_error(dlorch("status", "j-nope", env=env, check=False), "no job 'j-nope'")
    img, lab = synthetic_pair(tmp_path)
    _one_line_error(dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.png"),
                           env=env, check=False), "must end in .tif, .zarr or .npy")


def test_corrupt_image_file(env, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    _one_line_error(dlorch("segment", str(bad), "--labels", str(bad), "-o", str(tmp_path / "o.tif"),
                           env=env, check=False), "cannot read image", "bad.tif")
