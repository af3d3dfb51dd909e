"""Bad input exits non-zero with one line that names the problem: never a traceback, never lost data."""

import contextlib
import json
import sqlite3

import numpy as np
import pytest

from tests.conftest import synthetic_pair
from tests.system.harness import cli_env, dlorch, job_json


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
                           env=env, check=False), "must end in .tif, .zarr, .ome.zarr or .npy")


def test_corrupt_image_file(env, tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    _one_line_error(dlorch("segment", str(bad), "--labels", str(bad), "-o", str(tmp_path / "o.tif"),
                           env=env, check=False), "cannot read image", "bad.tif")


def test_out_of_range_options_fail_at_once_without_starting_anything(env, home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    for bad, said in ((["--priority", "101"], "'--priority': Input should be less than or equal to 100"),
                      (["--epochs", "1000000000"], "'--epochs': Input should be less than or equal to 100000"),
                      (["--time-budget", "inf"], "field 'time_budget'")):
        cp = dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), *bad,
                    env=env, check=False, timeout=30)  # it used to start a local service and hang in its close
        _one_line_error(cp, said)
    # A spec whose budget overflows to infinity would have been stored as non-JSON `Infinity` and
    # stopped every later orchestrator from replying: it is refused, and nothing is recorded.
    spec = tmp_path / "inf.json"
    spec.write_text('{"kind": "train", "image": "%s", "labels": "%s", "time_budget": 1e400}' % (img, lab))
    _one_line_error(dlorch("submit", str(spec), env=env, check=False), "field 'time_budget'", "finite")
    jobs = home / "ledger" / "jobs"
    assert not (jobs.exists() and list(jobs.glob("*.json")))


def test_a_damaged_ledger_record_is_named_and_kept_and_the_rest_still_works(env, home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    first = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", env=env).stdout.split()[-1]
    record = home / "ledger" / "jobs" / f"{first}.json"
    damaged = record.read_bytes()[:50]
    record.write_bytes(damaged)
    (home / "ledger" / "leader.json").write_text("garbage")
    _one_line_error(dlorch("status", first, env=env, check=False), "unreadable", str(record))
    listing = dlorch("jobs", env=env)
    assert first not in listing.stdout and "unreadable" in listing.stderr  # listed without it, and said why
    second = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", env=env).stdout.split()[-1]
    assert job_json(second, env)["status"] == "succeeded"  # an unreadable leader record does not block leadership
    assert record.read_bytes() == damaged  # never overwritten


def test_a_terminated_command_stops_what_it_started_and_the_next_runs_at_once(env, home, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    img, lab = synthetic_pair(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "dlorch.orchestrator.cli", "train", "segment", str(img), "--labels",
                             str(lab), "--epochs", "50"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    nodes = home / "ledger" / "nodes"
    deadline = time.monotonic() + 120
    while not (nodes.exists() and list(nodes.glob("*.json"))):
        assert time.monotonic() < deadline, "no local agent registered"
        time.sleep(0.2)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert children  # the local agent
    proc.send_signal(signal.SIGTERM)  # as `timeout` does
    _, err = proc.communicate(timeout=150)
    assert proc.returncode == 130 and "the job stays in the queue" in err
    for pid in children:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, "a local agent outlived the command that started it"
    # The abandoned 50-epoch job is first in the queue: cancelled, so that the next command's seconds are
    # its own and not the rest of that job's (under load those alone outlast any bound).
    (abandoned,) = [p.stem for p in (home / "ledger" / "jobs").glob("*.json")]
    t0 = time.monotonic()
    dlorch("cancel", abandoned, env=env, timeout=60)
    assert time.monotonic() - t0 < 30  # no wait for the dead command's leadership to expire
    dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", env=env, timeout=120)
    assert job_json(abandoned, env)["status"] == "cancelled"


def test_bad_models_are_one_line_naming_the_file_given(env, home, tmp_path):
    import torch

    img, lab = synthetic_pair(tmp_path)
    jid = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", env=env).stdout.split()[-1]
    model = next((home / "jobs" / jid).rglob("model.ckpt"))
    ckpt = torch.load(model, weights_only=True)
    own = next(v for v in ckpt.values() if isinstance(v, dict) and "plan" in v)
    first = next(iter(own["best_state"]))
    own["best_state"][first] = own["best_state"][first][..., :1]  # weights of another shape
    torch.save(ckpt, tmp_path / "reshaped.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(model.read_bytes()[:30000])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    cases = {"reshaped.ckpt": "weights do not fit", "truncated.ckpt": "not a readable model checkpoint",
             "foreign.ckpt": "not a dlorch segmentation checkpoint"}
    for name, needle in cases.items():
        _one_line_error(dlorch("predict", str(tmp_path / name), str(img), "-o", str(tmp_path / "p.tif"), env=env,
                               check=False), needle, name)
    _one_line_error(dlorch("predict", str(tmp_path / "missing.ckpt"), str(img), "-o", str(tmp_path / "p.tif"),
                           env=env, check=False), "model file not found", "missing.ckpt")
    pid = dlorch("predict", jid, str(img), "-o", str(tmp_path / "p.tif"), env=env).stdout.split()[-1]
    _one_line_error(dlorch("predict", pid, str(img), "-o", str(tmp_path / "q.tif"), env=env, check=False),
                    "makes no model", "training job")


def test_usage_errors_are_one_line_pointing_at_the_help(env, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    _one_line_error(dlorch("segment", str(img), "--labels", str(lab), "-o", str(tmp_path / "o.tif"), "--epochs", "0",
                           env=env, check=False), "'--epochs'", "dlorch segment --help")
    _one_line_error(dlorch("segment", str(img), "-o", str(tmp_path / "o.tif"), env=env, check=False),
                    "Missing option '--labels'")
    _one_line_error(dlorch("bogus", env=env, check=False), "No such command 'bogus'", "dlorch --help")


def test_evaluate_refuses_what_is_not_a_label_map_or_an_empty_selection(env, tmp_path):
    truth = np.ones((4, 32, 32), np.uint8)
    truth[:, :8] = 2
    np.save(tmp_path / "t.npy", truth)
    np.save(tmp_path / "image.npy", np.random.default_rng(0).random((4, 32, 32)).astype(np.float32))
    np.save(tmp_path / "blank.npy", np.zeros_like(truth))
    np.save(tmp_path / "as_float.npy", truth.astype(np.float32))  # whole numbers as floats: still labels
    assert "mean_iou: 1.0000" in dlorch("evaluate", str(tmp_path / "as_float.npy"), str(tmp_path / "t.npy"), env=env).stdout
    t = str(tmp_path / "t.npy")
    _one_line_error(dlorch("evaluate", str(tmp_path / "image.npy"), t, env=env, check=False), "not labels", "image.npy")
    _one_line_error(dlorch("evaluate", t, str(tmp_path / "blank.npy"), env=env, check=False), "no labelled pixel")
    _one_line_error(dlorch("evaluate", t, t, "--slices", "10:20", env=env, check=False), "selects none of the 4")
    _one_line_error(dlorch("evaluate", t, t, "--slices", "abc", env=env, check=False), "not a range")


def test_submit_takes_a_model_by_path_or_job_id_and_checks_the_output_suffix(env, tmp_path):
    import tifffile

    img, lab = synthetic_pair(tmp_path)
    jid = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", env=env).stdout.split()[-1]
    model = job_json(jid, env)["model"]
    for name, ref, out in (("by_path", model, "a.npy"), ("by_id", jid, "b.tif")):
        spec = tmp_path / f"{name}.json"
        spec.write_text(json.dumps({"kind": "predict", "image": str(img), "model": ref}))
        dlorch("submit", str(spec), "--wait", "-o", str(tmp_path / out), env=env)
    assert np.load(tmp_path / "a.npy").shape == np.load(img).shape  # an .npy, because -o said so
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), np.load(tmp_path / "a.npy"))
    _one_line_error(dlorch("submit", str(tmp_path / "by_id.json"), "--wait", "-o", str(tmp_path / "c.png"), env=env,
                           check=False), "must end in .tif, .zarr, .ome.zarr or .npy")
    _one_line_error(dlorch("submit", str(tmp_path), env=env, check=False), "is a directory")


def test_unusable_store_queue_or_key_settings_are_one_line(env, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    _one_line_error(dlorch("--store", str(a_file), "jobs", env=env, check=False), "cannot open dlorch's store",
                    "--store")
    (tmp_path / "bad.db").write_text("not a database")
    _one_line_error(dlorch("--queue", f"sqlite:///{tmp_path / 'bad.db'}", "jobs", env=env, check=False),
                    "file is not a database", "--queue")
    _one_line_error(dlorch("--queue", "redis://127.0.0.1:99999", "jobs", env=env, check=False), "bad queue URL")
    other = tmp_path / "app.db"  # another application's database: refused, and left as it was
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("create table users (name text)")
        db.commit()
    before = other.read_bytes()
    _one_line_error(dlorch("--queue", f"sqlite:///{other}", "jobs", env=env, check=False),
                    "is another database (tables users)", "--queue")
    assert other.read_bytes() == before
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.key").write_bytes(b"")
    _one_line_error(dlorch("jobs", env={**env, "DLORCH_HOME": str(home)}, check=False), "secret.key is empty")


def test_training_inputs_given_as_urls_are_refused_in_one_line(env, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    _one_line_error(dlorch("segment", "s3://bucket/image.npy", "--labels", str(lab), "-o", str(tmp_path / "o.tif"),
                           env=env, check=False), "training reads local files", "s3://bucket/image.npy")
    _one_line_error(dlorch("denoise", str(img), "--clean", "s3://bucket/clean.npy", "-o", str(tmp_path / "o.tif"),
                           env=env, check=False), "clean target is a URL")


def test_submit_checks_inputs_and_options_as_segment_does_before_anything_is_queued(env, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    np.save(tmp_path / "small.npy", np.zeros((2, 32, 32), np.uint8))

    def submit(**fields):
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"kind": "segment", "image": str(img), "labels": str(lab), **fields}))
        return dlorch("submit", str(spec), env=env, check=False)

    _one_line_error(submit(labels=str(tmp_path / "small.npy")), "labels shape (2, 32, 32)", "(2, 64, 64)")
    _one_line_error(submit(options={"varient": "ce-only"}), "options.varient", "takes accepted, accepted_weight, confidence, init_from, tta, variant")
    _one_line_error(submit(options={"variant": "resnet"}), "'resnet' is not a model variant", "ce-only")
    _one_line_error(submit(options={"tta": "yes"}), "options.tta", "true, false or null")
    _one_line_error(submit(kind="train", options={"tta": True}), "options.tta", "takes accepted, accepted_weight, init_from, variant")
    _one_line_error(submit(kind="denoise", task="denoising", labels=None, mode="n2n", target=str(tmp_path / "small.npy")),
                    "target shape (2, 32, 32) differs from image shape (2, 64, 64)")
    _one_line_error(submit(image=(tmp_path / "gone.npy").as_uri()), "image file://", "gone.npy does not exist")
    assert json.loads(dlorch("jobs", "--json", env=env).stdout) == []  # nothing was queued

    # A local target is uploaded with the image, as labels are (it was left as a path no node could read).
    spec = tmp_path / "n2n.json"
    spec.write_text(json.dumps({"kind": "denoise", "task": "denoising", "image": str(img), "mode": "n2n",
                                "target": str(img), "epochs": 1}))
    jid = dlorch("submit", str(spec), env=env).stdout.split()[-1]
    stored = job_json(jid, env)["spec"]
    assert stored["target"] == stored["image"] != str(img)  # the same bytes: one content-addressed blob
