"""Bad inputs raise ValueError with one line that says what is wrong and how to fix it."""

import numpy as np
import pytest

from dlorch.core.engine.segment import plan_segmentation


def _img(shape=(32, 32)):
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _two_classes(shape=(32, 32)):
    labels = np.zeros(shape, np.uint8)
    labels[..., 2:4, 2:6] = 1
    labels[..., 20:22, 2:6] = 2
    return labels


@pytest.mark.parametrize(
    "image, labels, match",
    [
        (_img(), _two_classes((32, 31)), "differs from image shape"),
        (_img(), np.zeros((32, 32), np.uint8), "no labelled pixels"),
        (_img(), (_two_classes() == 1).astype(np.uint8), "only class 1"),
        (_img(), _two_classes() * 2, r"without gaps"),
        (_img((2, 2, 32, 32)), _two_classes((2, 2, 32, 32)), "2D"),
        (np.full((32, 32), np.nan), _two_classes(), "NaN"),
        (_img(), _two_classes().astype(np.float32), "integer labels"),
        (_img(), _two_classes().astype(np.int16) - 1, "0..255"),
    ],
)
def test_bad_inputs_raise_a_one_line_value_error(image, labels, match):
    with pytest.raises(ValueError, match=match) as info:
        plan_segmentation(image, labels, epochs=1)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # what is wrong; how to fix it
