"""Prediction from a checkpoint: shapes and dtypes, tiling equal to a whole-image pass, quality."""

import numpy as np
import pytest
import torch

from dlorch.core.engine.device import keep_freed_memory
from dlorch.core.engine.segment import NoHooks, load_model, predict_probabilities, predict_segmentation, train_segmentation
from dlorch.core.engine.segment.intensity import normalize
from dlorch.core.engine.segment.predict import prediction_grid

from .conftest import fast_plan, make_scene


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=2, steps=15)
    workdir = tmp_path_factory.mktemp("ckpt")
    return train_segmentation(image, labels, plan, workdir=workdir, resume_from=None, hooks=NoHooks()).checkpoint


def test_prediction_equals_a_whole_image_forward_pass_when_the_image_fits(checkpoint, tiny_data, monkeypatch):
    monkeypatch.setenv("DLORCH_PRECISION", "32")  # the windows' arithmetic, to float32's tolerance
    image = tiny_data[0]
    probs = predict_probabilities(checkpoint, image, priors=None)
    net, plan = load_model(checkpoint)
    with torch.no_grad():
        whole = torch.softmax(net(torch.from_numpy(normalize(image)[:, None])), 1).numpy().transpose(1, 0, 2, 3)
    assert probs.shape == (plan.num_classes, *image.shape)
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_bf16_prediction_keeps_float32s_labels(checkpoint, tiny_data, monkeypatch):
    """bf16 autocast (chosen on CPUs with bf16 units, and on GPUs) rounds every product to 8 bits of
    mantissa: the probabilities move by about a hundredth, a label only where two classes tie."""
    image = tiny_data[0]
    monkeypatch.setenv("DLORCH_PRECISION", "32")
    full = predict_probabilities(checkpoint, image, priors=None)
    monkeypatch.setenv("DLORCH_PRECISION", "bf16")
    half = predict_probabilities(checkpoint, image, priors=None)
    assert half.dtype == np.float32 and half.shape == full.shape
    assert not np.array_equal(half, full)  # bf16 did run
    assert np.abs(half - full).max() < 0.05
    assert ((half.argmax(0) == full.argmax(0)) | (np.abs(full[0] - full[1]) < 0.05)).all()
    np.testing.assert_allclose(half.sum(0), 1.0, atol=1e-5)


def test_label_map_has_the_image_shape_and_classes_1_to_k(checkpoint, tiny_data):
    image = tiny_data[0]
    for img in (image, image[0]):
        seg = predict_segmentation(checkpoint, img)
        assert seg.shape == img.shape and seg.dtype == np.uint8
        assert set(np.unique(seg)) <= {1, 2}


def test_a_larger_image_is_tiled_and_still_segmented(checkpoint):
    # An image wider than the prediction window goes through several blended tiles.
    image, _, truth = make_scene((1, 64, 200), seed=3)
    net, plan = load_model(checkpoint)
    plan = plan.model_copy(update={"infer_roi": [64, 64]})
    assert len(prediction_grid(plan, image.shape).inside((0, 0), (64, 200))) == 4
    seg = predict_probabilities(None, image, model=(net, plan)).argmax(0) + 1
    assert seg.shape == image.shape
    print("accuracy", (seg == truth).mean())
    assert (seg == truth).mean() > 0.8


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a dlorch"):
        predict_segmentation(path, np.zeros((8, 8), np.float32))


def test_prior_shift_is_estimated_and_undone():
    from dlorch.core.engine.segment.priors import adjust_priors, estimate_priors

    rng = np.random.default_rng(0)
    first = rng.random(200_000) < 0.2  # 20% of the image is the first class
    # A calibrated classifier trained at 50/50 that sees a feature 4x likelier in its own class.
    feature = np.where(first, rng.random(first.size) < 0.8, rng.random(first.size) < 0.2)
    p_first = np.where(feature, 0.8, 0.2)
    probs = np.stack([p_first, 1 - p_first]).astype(np.float32)
    est = estimate_priors(probs, np.array([0.5, 0.5]))
    assert abs(est[0] - 0.2) < 0.02
    adjusted = adjust_priors(probs, np.array([0.5, 0.5]), est)
    np.testing.assert_allclose(adjusted.sum(0), 1, atol=1e-5)
    # Bayes' posterior under the image's 20% prior: 0.5 where the feature is seen, 1/17 elsewhere.
    np.testing.assert_allclose(adjusted[0][feature], 0.5, atol=0.03)
    np.testing.assert_allclose(adjusted[0][~feature], 1 / 17, atol=0.01)
    same = adjust_priors(probs, np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(same, probs, atol=1e-6)


def test_checkpoint_records_the_training_class_prior(checkpoint):
    _, plan = load_model(checkpoint)
    assert plan.train_prior is not None and abs(sum(plan.train_prior) - 1) < 1e-6


def test_test_time_augmentation_is_equivariant_and_differs_from_plain(checkpoint, tiny_data):
    image = tiny_data[0][:1]  # one square slice that fits one window
    assert image.shape[-1] == image.shape[-2]
    tta = predict_probabilities(checkpoint, image, priors=None, tta=True)
    plain = predict_probabilities(checkpoint, image, priors=None)
    assert tta.shape == plain.shape and np.allclose(tta.sum(0), 1.0, atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-4)  # it did average something
    # The 8 flips/rotations form a group: TTA of a rotated (or mirrored) image is the rotated TTA output.
    from dlorch.core.engine.segment.intensity import intensity_stats

    stats = intensity_stats(image)
    base = predict_probabilities(checkpoint, image, stats=stats, priors=None, tta=True)
    for transform in (lambda a: np.rot90(a, 1, axes=(-2, -1)), lambda a: a[..., ::-1]):
        moved = predict_probabilities(checkpoint, np.ascontiguousarray(transform(image)), stats=stats,
                                      priors=None, tta=True)
        np.testing.assert_allclose(moved, transform(base), atol=1e-5)
    seg = predict_segmentation(checkpoint, image, tta=True)
    assert seg.shape == image.shape and set(np.unique(seg)) <= {1, 2}


def _balls(shape=(32, 48, 48), seed=0):
    """Bright balls (class 2) in a noisy dark volume (class 1), strokes on a few slices: (image, strokes, truth)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = np.ones(shape, np.uint8)
    for _ in range(6):
        c, r = rng.integers(8, np.array(shape) - 8), rng.integers(5, 8)
        truth[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r**2] = 2
    image = (truth + rng.normal(0, 0.35, shape)).astype(np.float32)
    strokes = np.zeros(shape, np.uint8)
    for z in (6, 16, 26):
        paint = rng.random(shape[1:]) < 0.1
        strokes[z][paint] = truth[z][paint]
    return image, strokes, truth


def test_a_volume_trains_and_predicts_in_3d_and_tiles_like_a_whole_pass(tmp_path, monkeypatch):
    image, strokes, truth = _balls()
    plan = fast_plan(image, strokes, epochs=2, steps=20, batch_size=2)
    assert plan.spatial_dims == 3 and len(plan.patch_size) == 3 and plan.anisotropy < 2
    checkpoint = train_segmentation(image, strokes, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks()).checkpoint
    # The network's own answer: the prior correction is another test's subject, and EM on the
    # posteriors of a model trained for 40 steps is not what this one is about.
    seg = predict_probabilities(checkpoint, image, priors=None).argmax(0) + 1
    assert seg.shape == image.shape and (seg == truth).mean() > 0.9
    # A volume that fits the window is one pass; windows smaller along every axis, blended, agree with it
    # (in float32: trained as the device chose, the windows' arithmetic is compared to float32's tolerance).
    monkeypatch.setenv("DLORCH_PRECISION", "32")
    net, plan = load_model(checkpoint)
    with torch.no_grad():
        whole = torch.softmax(net(torch.from_numpy(normalize(image)[None, None])), 1)[0].numpy()
    np.testing.assert_allclose(predict_probabilities(None, image, model=(net, plan), priors=None), whole, atol=1e-5)
    tiled = predict_probabilities(None, image, model=(net, plan.model_copy(update={"infer_roi": [16, 32, 32]})),
                                  priors=None)
    assert (tiled.argmax(0) == whole.argmax(0)).mean() > 0.97
    flipped = predict_probabilities(None, image[:, :, ::-1].copy(), model=(net, plan), priors=None, tta=True)
    np.testing.assert_allclose(flipped[:, :, :, ::-1], predict_probabilities(None, image, model=(net, plan),
                                                                              priors=None, tta=True), atol=1e-5)


def test_a_runaway_prior_estimate_is_not_used():
    from dlorch.core.engine.segment.priors import estimate_priors

    rng = np.random.default_rng(1)
    # Overconfident in the rarer class everywhere: EM would push its share to the bound.
    probs = np.stack([rng.uniform(0.2, 0.5, 100_000), np.zeros(100_000)]).astype(np.float32)
    probs[1] = 1 - probs[0]
    np.testing.assert_allclose(estimate_priors(probs, np.array([0.9, 0.1])), [0.9, 0.1])


@pytest.mark.parametrize("tta", [False, True])
def test_a_block_predicted_alone_equals_the_whole_pass_over_its_core(checkpoint, tta):
    from dlorch.core.blocks import plan_blocks
    from dlorch.core.engine.segment.intensity import intensity_stats
    from dlorch.core.engine.segment.predict import prediction_grid

    image, _, _ = make_scene((3, 150, 200), seed=5)
    net, plan = load_model(checkpoint)
    plan = plan.model_copy(update={"infer_roi": [64, 64]})  # many windows, overlapping the block borders
    model, stats, priors = (net, plan), intensity_stats(image), np.array([0.4, 0.6])
    whole = predict_probabilities(None, image, model=model, stats=stats, priors=priors, tta=tta)
    blocks = plan_blocks(image.shape, (1, 32, 32), (0, 0, 0), 3000, prediction_grid(plan, image.shape).read_region)
    assert len(blocks) > 12 and any(b.read != b.core for b in blocks)
    stitched = np.full_like(whole, np.nan)
    for b in blocks:
        region = image[b.read_slices()]
        probs = predict_probabilities(None, region, model=model, stats=stats, priors=priors, tta=tta,
                                      volume_shape=image.shape, origin=tuple(a for a, _ in b.read))
        stitched[(slice(None), *b.core_slices())] = probs[(slice(None), *b.crop())]
    np.testing.assert_array_equal(stitched, whole)  # 2D on a CPU: the same windows, bit for bit


def test_prediction_follows_the_plans_test_time_augmentation_unless_told(checkpoint, tiny_data):
    image = tiny_data[0][:1]
    net, plan = load_model(checkpoint)
    on, off = plan.model_copy(update={"tta": True}), plan.model_copy(update={"tta": False})
    with_tta = predict_probabilities(None, image, model=(net, off), priors=None, tta=True)
    np.testing.assert_array_equal(predict_probabilities(None, image, model=(net, on), priors=None), with_tta)
    np.testing.assert_array_equal(predict_probabilities(None, image, model=(net, on), priors=None, tta=False),
                                  predict_probabilities(None, image, model=(net, off), priors=None))


_STEP_FAULTS = """
import resource, sys, threading, torch
from dlorch.core.malloc import keep_freed_memory, one_arena
where, settings = sys.argv[1], sys.argv[2]
if "one" in settings:
    one_arena()
if "keep" in settings:
    keep_freed_memory()
def work():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 4, 3, padding=1))
    x = torch.randn(8, 4, 256, 256)  # 64 MiB activations, as a training batch has
    def step():
        net(x).square().mean().backward()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if where == "main":
    work()
else:
    t = threading.Thread(target=work)
    t.start()
    t.join()
"""


def _step_faults(where: str, settings: str) -> int:
    """Page faults of five training-like steps in a fresh process, on its main thread or a worker."""
    import subprocess
    import sys

    cp = subprocess.run([sys.executable, "-c", _STEP_FAULTS, where, settings], capture_output=True, text=True,
                        check=True)
    return int(cp.stdout.split()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc only")
def test_freed_activations_are_kept_for_the_next_step():
    # Without it every block over the mmap threshold came from a fresh mapping: 850,000 page faults
    # in five steps here, 33,000 with it.
    plain, keep = _step_faults("main", "plain"), _step_faults("main", "keep")
    assert plain > 100_000  # what this guards against still happens without it
    assert keep < plain / 10


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc only")
def test_training_steps_on_a_worker_thread_reuse_their_memory_with_one_arena():
    # The agent trains on a worker thread. In an arena of its own (64 MiB heaps) the kept memory is not
    # reused: 750,000 page faults in five steps, 8,000-12,000 with every thread in the main arena.
    own, one = _step_faults("worker", "keep"), _step_faults("worker", "keep one")
    assert own > 100_000
    assert one < own / 10


@pytest.mark.parametrize("dims", [2, 3])
def test_folded_batch_norms_give_the_same_output_with_no_norm_left(dims):
    from monai.networks.nets import DynUNet

    from dlorch.core.engine.network import build_unet, fold_batch_norm

    torch.manual_seed(0)
    nets = [build_unet(dims, 1, 3, [8, 16, 32], "batch"),
            DynUNet(dims, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 12, 16], norm_name="batch", res_block=True)]
    for net in nets:
        for m in net.modules():  # running statistics and affine parameters far from identity
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.2, 3)
                m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-0.5, 0.5)
        net.eval()
        folded = fold_batch_norm(net)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())  # a copy
        x = torch.randn(2, 1, *([16] * dims))
        with torch.no_grad():
            np.testing.assert_allclose(folded(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-4)


def test_a_loaded_model_has_its_norms_folded_and_predicts_as_its_training_weights(checkpoint, tiny_data):
    from dlorch.core.engine.network import build_unet
    from dlorch.core.engine.segment.module import CKPT_KEY

    net, plan = load_model(checkpoint)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    own = torch.load(checkpoint, map_location="cpu", weights_only=True)[CKPT_KEY]
    trained = build_unet(plan.spatial_dims, 1, plan.num_classes, plan.filters, plan.norm, plan.input_scale)
    trained.load_state_dict(own["best_state"])
    x = torch.from_numpy(normalize(tiny_data[0])[:, None])
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), trained.eval()(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_labels_from_probabilities_are_the_argmax_plus_one_with_ties_to_the_lower_class(k):
    from dlorch.core.engine.segment.predict import labels_from_probabilities

    probs = np.random.default_rng(k).random((k, 7, 33, 20)).astype(np.float32)
    probs[:, :, :4] = 0.5  # ties everywhere in these rows
    probs = probs[:, :, 2:, 1:]  # a block's crop: not contiguous
    labels = labels_from_probabilities(probs)
    assert labels.dtype == np.uint8 and labels.shape == probs.shape[1:]
    np.testing.assert_array_equal(labels, probs.argmax(0) + 1)


def test_half_resolution_logits_come_back_in_the_plain_layout():
    """Rescaled upsamples from the plain layout (3x faster on a CPU than channels-last with few
    channels) and gives the same numbers as upsampling the network's channels-last output."""
    from dlorch.core.engine.network import Rescaled, build_unet

    torch.manual_seed(0)
    net = build_unet(2, 1, 2, [8, 16, 32], input_scale=2).eval().to(memory_format=torch.channels_last)
    assert isinstance(net, Rescaled)
    x = torch.randn(1, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = net(x)
        small = net.net(torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True))
        ref = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
    assert small.is_contiguous(memory_format=torch.channels_last) and not small.is_contiguous()
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
