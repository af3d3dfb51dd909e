"""The job model: spec validation, statuses and their transitions."""

import pytest

from dlorch.core.errors import BadInput
from dlorch.core.spec import TRANSITIONS, JobStatus, parse_spec


def test_unknown_field_is_named():
    with pytest.raises(BadInput, match="field 'colour'"):
        parse_spec({"kind": "segment", "image": "a", "labels": "b", "colour": "red"})


def test_bad_value_is_named():
    with pytest.raises(BadInput, match="field 'epochs'"):
        parse_spec('{"kind": "train", "image": "a", "labels": "b", "epochs": -3}')


def test_training_needs_labels_and_predict_needs_model():
    with pytest.raises(BadInput, match="labels"):
        parse_spec({"kind": "segment", "image": "a"})
    with pytest.raises(BadInput, match="model"):
        parse_spec({"kind": "predict", "image": "a"})
    assert parse_spec({"kind": "predict", "image": "a", "model": "m"}).trains is False


def test_terminal_statuses_have_no_way_out():
    for status in JobStatus:
        assert status.is_terminal() == (not TRANSITIONS[status])
    assert JobStatus.QUEUED in TRANSITIONS[JobStatus.RUNNING]  # hand-back and lease expiry


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"kind": "segment", "labels": "l", "options": {"variant": "ce-only", "tta": False}}, None),
        ({"kind": "predict", "model": "m", "options": {"block_voxels": 4096, "tta": None}}, None),
        ({"kind": "predict", "model": "m", "task": "denoising", "options": {"block_voxels": 1}}, None),
        ({"kind": "segment", "labels": "l", "options": {"block_voxels": 10}},
         "takes accepted, accepted_weight, confidence, init_from, tta, variant"),
        ({"kind": "predict", "model": "m", "options": {"variant": "ce-only"}}, "takes block_voxels, confidence, "),
        ({"kind": "train", "labels": "l", "options": {"init_from": "j-1", "accepted": "a", "accepted_weight": 1}}, None),
        ({"kind": "train", "labels": "l", "options": {"confidence": True}}, "takes accepted, accepted_weight, init_from"),
        ({"kind": "train", "labels": "l", "options": {"init_from": ""}}, "non-empty model reference"),
        ({"kind": "train", "labels": "l", "options": {"accepted": "a", "accepted_weight": 0}}, r"in \(0, 1\]"),
        ({"kind": "train", "labels": "l", "options": {"accepted": "a", "accepted_weight": True}}, r"in \(0, 1\]"),
        ({"kind": "train", "labels": "l", "options": {"accepted_weight": 0.5}}, "give options.accepted too"),
        ({"kind": "predict", "model": "m", "options": {"confidence": 1}}, "true or false"),
        ({"kind": "predict", "model": "m", "options": {"confidence": True}, "image": "v.zarr", "output_format": "zarr"},
         "written for whole images"),
        ({"kind": "predict", "model": "m", "task": "denoising", "options": {"tta": True}}, "takes block_voxels"),
        ({"kind": "denoise", "task": "denoising", "options": {"variant": "ce-only"}}, "takes no options"),
        ({"kind": "train", "labels": "l", "options": {"variant": "unet"}}, "not a model variant"),
        ({"kind": "predict", "model": "m", "options": {"block_voxels": 0}}, "from 1 to 2**40"),
        ({"kind": "predict", "model": "m", "options": {"block_voxels": 2.5}}, "whole number"),
        ({"kind": "predict", "model": "m", "options": {"block_voxels": True}}, "whole number"),
        ({"kind": "segment", "labels": "l", "options": {"tta": 1}}, "true, false or null"),
    ],
)
def test_engine_options_are_checked_per_kind_of_job(fields, problem):
    spec = {"image": "i", **fields}
    if problem is None:
        assert parse_spec(spec).options == fields["options"]
    else:
        with pytest.raises(BadInput, match=problem.replace("**", r"\*\*")):
            parse_spec(spec)
