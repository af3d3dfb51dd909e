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
