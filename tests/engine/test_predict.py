"""Prediction from a checkpoint: shapes and dtypes, tiling equal to a whole-image pass, quality."""

import numpy as np
import pytest
import torch

from dlorch.core.engine.intensity import normalize
from dlorch.core.engine.segment import NoHooks, load_model, predict_probabilities, predict_segmentation, train_segmentation

from .conftest import fast_plan, make_scene


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=2, steps=15)
    workdir = tmp_path_factory.mktemp("ckpt")
    return train_segmentation(image, labels, plan, workdir=workdir, resume_from=None, hooks=NoHooks()).checkpoint


def test_prediction_equals_a_whole_image_forward_pass_when_the_image_fits(checkpoint, tiny_data):
    image = tiny_data[0]
    probs = predict_probabilities(checkpoint, image)
    net, plan = load_model(checkpoint)
    with torch.no_grad():
        whole = torch.softmax(net(torch.from_numpy(normalize(image)[:, None])), 1).numpy().transpose(1, 0, 2, 3)
    assert probs.shape == (plan.num_classes, *image.shape)
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_label_map_has_the_image_shape_and_classes_1_to_k(checkpoint, tiny_data):
    image = tiny_data[0]
    for img in (image, image[0]):
        seg = predict_segmentation(checkpoint, img)
        assert seg.shape == img.shape and seg.dtype == np.uint8
        assert set(np.unique(seg)) <= {1, 2}


def test_a_larger_image_is_tiled_and_still_segmented(checkpoint):
    # An image wider than the prediction window goes through several blended tiles.
    image, _, truth = make_scene((1, 64, 200), seed=3)
    seg = predict_segmentation(checkpoint, image)
    assert seg.shape == image.shape
    print("accuracy", (seg == truth).mean())
    assert (seg == truth).mean() > 0.8


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a dlorch"):
        predict_segmentation(path, np.zeros((8, 8), np.float32))
