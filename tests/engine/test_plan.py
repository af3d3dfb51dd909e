"""Planning rules: patch and depth follow the image, overrides are respected, budgets are fitted."""

import json

import numpy as np
import pytest

from dlorch.core.engine.anisotropy import anisotropy
from dlorch.core.engine.device import Runtime
from dlorch.core.engine.network import choose_filters
from dlorch.core.engine.segment.geometry import choose_batch, choose_geometry, choose_patch, stroke_survival
from dlorch.core.engine.segment.intensity import intensity_stats
from dlorch.core.engine.segment.plan import SegmentationPlan, derive_plan, plan_segmentation

from .conftest import make_data

CPU = Runtime("cpu", "32-true", 2)


def _derive(**kw):
    args = dict(
        image_shape=(30, 512, 512),
        class_pixels=[25000, 25000],
        intensity=intensity_stats(np.arange(10.0)),
        runtime=CPU,
        geometry=choose_geometry((512, 512), "cpu", 0.6),
        val_tiles=40,
        val_strokes=50,
        step_seconds=0.25,
        eval_seconds=0.08,
    )
    args.update(kw)
    return derive_plan(**args)


def test_tiny_image_gets_a_small_patch_and_a_shallow_network(tiny_data):
    image, labels = tiny_data
    plan = plan_segmentation(image[0, :40, :40], labels[0, :40, :40], epochs=1)
    assert plan.patch_size == [48, 48]
    assert len(plan.filters) < 5
    assert any("smaller than" in r for r in plan.reasons)


def test_patch_and_depth_rules():
    assert choose_patch((512, 512), 128) == [128, 128]
    assert choose_patch((40, 700), 128) == [48, 128]
    assert choose_patch((3, 3), 128) == [16, 16]
    assert choose_filters([128, 128], [16, 24, 48, 96, 192]) == [16, 24, 48, 96, 192]
    # The smallest patch still gets three levels: DynUNet cannot be built with fewer (an 8x8 image failed so).
    assert choose_filters([16, 16], [16, 24, 48, 96, 192]) == [16, 24, 48]
    from dlorch.core.engine.network import build_unet

    build_unet(2, 1, 2, choose_filters([16, 16], [16, 24, 48, 96, 192]))
    with pytest.raises(ValueError, match="at least 8x8"):
        plan_segmentation(np.zeros((1, 4, 4), np.float32), np.array([[[1, 2, 0, 0]] * 4], np.uint8))


def test_half_resolution_only_for_large_images_with_thick_strokes():
    thick = choose_geometry((512, 512), "cpu", 0.6)
    assert thick.input_scale == 2 and thick.patch == [256, 256]
    assert len(thick.filters) == 5  # depth follows the network's view: 128 px
    assert choose_geometry((512, 512), "cpu", 0.0).input_scale == 1
    assert choose_geometry((200, 512), "cpu", 0.6).input_scale == 1


def test_stroke_survival_measures_stroke_thickness():
    labels = np.zeros((1, 32, 32), np.uint8)
    labels[0, 2, 2:30] = 1  # a 1-pixel scribble
    labels[0, 10:16, 2:30] = 2  # a 6-pixel stroke
    assert stroke_survival(labels) == 0.0
    labels[0, 2:8, 2:30] = 1
    assert stroke_survival(labels) > 0.5


def test_epochs_override_is_used_as_given_without_a_default_cap():
    plan = _derive(epochs=7)
    assert plan.epochs == 7 and plan.time_budget_s is None
    assert _derive(epochs=7, time_budget=30.0).time_budget_s == 30.0


def test_automatic_epochs_fit_the_budget():
    plan = _derive()
    assert plan.time_budget_s == 330
    planned = plan.epochs * (plan.steps_per_epoch * 0.25 + 5 * 0.08)
    assert planned <= 330
    short = _derive(time_budget=60.0)
    assert short.time_budget_s == 60.0 and short.epochs < plan.epochs


def test_a_fast_device_stops_at_the_data_step_target():
    plan = _derive(step_seconds=0.001, eval_seconds=0.0005, time_budget=10_000.0)
    assert plan.epochs * plan.steps_per_epoch < 10_000 / 0.001 / 10
    assert plan.epochs_ceiling is None  # the data, not the budget, set the count: nothing to re-fit


def test_a_budget_limited_count_is_final_not_re_fitted_from_the_stopwatch():
    plan = _derive()  # 330 s at 0.25 s per step: the budget limits it
    assert plan.epochs_ceiling is None and plan.epochs * plan.steps_per_epoch < 4000
    assert not any("re-fitted" in r for r in plan.reasons)
    assert _derive(epochs=7).epochs_ceiling is None  # the user's count is run as given
    assert SegmentationPlan.model_validate_json(plan.model_dump_json()) == plan


@pytest.mark.parametrize("planned, ceiling, done, seconds, budget, expected", [
    (26, 70, 1, 13.5, 600.0, 40),    # epochs of 13.5 s, not the 20.7 s measured: 552 s fit 40
    (26, 70, 2, 27.0, 600.0, 40),    # the same, later
    (26, 30, 2, 27.0, 600.0, 30),    # never past the data's step target
    (26, 70, 2, 60.0, 600.0, 26),    # slower than planned: never shortened (the time cap ends it)
    (26, 70, 25, 545.0, 600.0, 26),  # the budget is spent: the plan stands
    (26, None, 2, 27.0, 600.0, 26),  # a count that is final
    (26, 70, 2, 27.0, None, 26),     # no budget to fit
    (26, 70, 0, 0.0, 600.0, 26),     # nothing measured yet
])
def test_epochs_are_re_fitted_to_the_budget_from_their_real_length(planned, ceiling, done, seconds, budget, expected):
    from dlorch.core.engine.segment.plan import extended_epochs

    assert extended_epochs(planned, ceiling, done, seconds, budget) == expected


def test_plan_round_trips_through_json(tiny_data):
    plan = plan_segmentation(*tiny_data, epochs=2)
    again = SegmentationPlan.model_validate(json.loads(plan.model_dump_json()))
    assert again == plan
    assert plan.num_classes == 2 and plan.reasons


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"time_budget": 0.0}, {"time_budget": -5.0}])
def test_bad_overrides_raise(tiny_data, bad):
    with pytest.raises(ValueError, match="must be"):
        plan_segmentation(*tiny_data, **bad)


def test_planning_a_2d_image():
    image, labels = make_data((1, 64, 64))
    plan = plan_segmentation(image[0], labels[0], epochs=1)
    assert plan.image_shape == [1, 64, 64]


def _smooth_volume(shape=(64, 64, 64), scale=4.0, seed=0):
    """An isotropic random texture: white noise low-passed by a Gaussian of ``scale`` voxels."""
    noise = np.random.default_rng(seed).normal(size=shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    gain = np.exp(-2 * (np.pi * scale) ** 2 * sum(f**2 for f in freqs))
    return np.fft.ifftn(np.fft.fftn(noise) * gain).real.astype(np.float32)


def test_anisotropy_is_measured_from_the_data():
    vol = _smooth_volume()
    assert anisotropy(vol) < 1.5  # neighbouring slices as alike as neighbouring pixels
    sections = vol[::6]  # every 6th slice: serial sections cut six pixels thick
    assert 4 < anisotropy(sections) < 9
    assert anisotropy(np.random.default_rng(1).normal(size=(20, 64, 64))) == 1.0  # white noise: no structure
    assert anisotropy(vol[:1]) == float("inf")


def test_a_near_isotropic_volume_gets_3d_and_an_anisotropic_stack_gets_2d():
    iso = choose_geometry((256, 256), "cpu", 0.6, depth=64, aniso=1.2)
    assert iso.spatial_dims == 3 and iso.input_scale == 1 and len(iso.patch) == 3
    assert iso.patch == [64, 64, 64] and len(iso.filters) == 4
    sections = choose_geometry((256, 256), "cpu", 0.6, depth=64, aniso=8.0)
    assert sections.spatial_dims == 2 and len(sections.patch) == 2
    assert any("slice by slice" in r and "8.0" in r for r in sections.reasons)
    thin = choose_geometry((256, 256), "cpu", 0.6, depth=5, aniso=1.0)
    assert thin.spatial_dims == 2
    plan = _derive(image_shape=(64, 256, 256), geometry=iso)
    assert plan.spatial_dims == 3 and len(plan.infer_roi) == 3 and plan.batch_size == 2


def test_a_gpu_with_more_memory_gets_a_larger_batch():
    geometry = choose_geometry((512, 512), "cuda", 0.6)
    small = _derive(runtime=Runtime("cuda", "bf16-mixed", 8, 16 * 2**30), geometry=geometry)
    large = _derive(runtime=Runtime("cuda", "bf16-mixed", 8, 80 * 2**30), geometry=geometry)
    tiny = _derive(runtime=Runtime("cuda", "bf16-mixed", 8, 4 * 2**30), geometry=geometry)
    assert tiny.batch_size < small.batch_size < large.batch_size
    assert any("80 GiB" in r for r in large.reasons)
    # A CPU keeps its default unless its memory cannot hold the batch's activations.
    assert _derive(runtime=Runtime("cpu", "32-true", 2, 24 * 2**30)).batch_size == 8
    batch, why = choose_batch(8, [128, 128, 128], [32, 64, 128, 256], 1, Runtime("cpu", "32-true", 2, 2 * 2**30))
    assert batch < 8 and "memory fits" in why


def test_job_specs_accept_exactly_the_zoo_variants():
    from dlorch.core.engine.segment.zoo import VARIANTS
    from dlorch.core.spec import MODEL_VARIANTS

    assert tuple(VARIANTS) == MODEL_VARIANTS  # specs are checked against the names without importing the engine


def test_the_other_geometry_candidate_swaps_2d_and_3d():
    from dlorch.core.engine.segment.zoo import apply_variant, candidate_names

    assert candidate_names(5)[-1] == "other-geometry"
    stack_2d = _derive(image_shape=(64, 256, 256))  # a stack the automatic plan segments in 2D, half resolution
    as_3d = apply_variant(stack_2d, "other-geometry")
    assert as_3d.spatial_dims == 3 and len(as_3d.patch_size) == 3 and as_3d.input_scale == 1
    assert len(as_3d.infer_roi) == 3 and "3D U-Net" in as_3d.reasons[-1]
    back = apply_variant(as_3d, "other-geometry")
    assert back.spatial_dims == 2 and len(back.patch_size) == 2
    thin = apply_variant(_derive(image_shape=(5, 512, 512)), "other-geometry")
    assert thin.spatial_dims == 2 and thin.input_scale == 1 and "full resolution" in thin.reasons[-1]
    SegmentationPlan.model_validate(json.loads(as_3d.model_dump_json()))


def test_validation_of_a_volume_keeps_fewer_bigger_tiles():
    from dlorch.core.engine.segment.sampling import max_val_tiles

    assert max_val_tiles([256, 256]) == 256  # 2D plans as before
    assert max_val_tiles([64, 64, 64]) == 64  # the same voxels in 3D tiles
    assert max_val_tiles([512, 512, 512]) == 1


def test_test_time_augmentation_is_on_where_it_is_cheap_next_to_training():
    # ISBI-like: 30 slices of 512x512 predict in seconds; 8 flips/rotations fit beside minutes of training.
    isbi = _derive()
    assert isbi.tta and any("test-time augmentation on" in r for r in isbi.reasons)
    # A 3D volume of 256^3 on a CPU: each forward pass of two 64^3 patches takes ~1 s, so one pass over the
    # volume takes minutes and seven more would outlast the training.
    iso = choose_geometry((256, 256), "cpu", 0.6, depth=256, aniso=1.0)
    big = _derive(image_shape=(256, 256, 256), geometry=iso, step_seconds=3.0, eval_seconds=1.0)
    assert big.spatial_dims == 3 and not big.tta
    assert any("test-time augmentation off" in r and "over 50%" in r for r in big.reasons)
    # Not measured: no basis for the cost, so off.
    assert not _derive(step_seconds=None, eval_seconds=None).tta
    # The other-geometry candidate does not inherit TTA into a dearer geometry.
    from dlorch.core.engine.segment.zoo import apply_variant

    assert not apply_variant(_derive(image_shape=(64, 256, 256)), "other-geometry").tta


def test_an_automatic_plan_stops_at_a_plateau_and_a_given_epoch_count_does_not():
    assert _derive().stop_at_plateau and any("ends early" in r for r in _derive().reasons)
    assert not _derive(epochs=30).stop_at_plateau
    assert not _derive(val_strokes=0, val_tiles=0).stop_at_plateau  # nothing held out: nothing to see a plateau by


@pytest.mark.parametrize("done, kept, peak, planned, stop", [
    (27, 22, 9, 66, True),     # ISBI: best at epoch 9, last kept at 22, none kept since
    (26, 22, 9, 66, False),
    (8, 2, 2, 66, False),      # an early peak: at least a quarter of the epochs run first
    (17, 2, 2, 66, True),
    (20, 18, 2, 66, False),    # still keeping later weights
    (4, 1, 1, 8, True),        # at least 3 epochs since the last kept
    (3, 1, 1, 8, False),
    (50, 0, 0, 66, False),     # no held-out score yet
])
def test_plateau_rule(done, kept, peak, planned, stop):
    from dlorch.core.engine.segment.plan import plateaued

    assert plateaued(done, kept, peak, planned) is stop


def test_the_prediction_window_is_the_devices_not_the_training_images():
    # Trained on 512 px slices, a model predicts a 1024 px volume one window per slice, not nine
    # overlapping 512 px ones (2.25x the voxels); a small image still gets one window its own size.
    from dlorch.core.engine.segment.predict import prediction_grid

    plan = _derive()
    assert plan.infer_roi == [1024, 1024]
    big = prediction_grid(plan, (4, 1024, 1024))
    assert big.roi == (1024, 1024) and big.inside((0, 0), (1024, 1024)) == [(0, 0)]
    small = prediction_grid(plan, (4, 300, 200))
    assert small.roi == (320, 224) and len(small.inside((0, 0), (300, 200))) == 1
    wide = prediction_grid(plan, (1, 512, 2048))
    assert wide.roi == (512, 1024) and [s for _, s in wide.inside((0, 0), (512, 2048))] == [0, 768, 1024]


def test_tta_is_on_exactly_when_seven_more_passes_fit_in_half_the_training():
    from dlorch.core.engine.segment.plan import TTA_SHARE, choose_tta

    # A forward pass of 2 x 32^3 voxels in 0.1 s: a 64 x 256 x 256 volume with 0.25 overlap is
    # 64 x 256 x 256 / (2 x 32^3) / 0.75^3 = 151.7 such passes, 15.2 s; seven more 106 s.
    predict_s = 0.1 / (2 * 32**3) * 64 * 256 * 256 / 0.75**3
    on, why = choose_tta((64, 256, 256), 3, [32, 32, 32], 2, 0.1, train_seconds=7 * predict_s / TTA_SHARE + 1)
    assert on and why.startswith("test-time augmentation on: 8 flips/rotations would add ~106 s to ~15 s")
    off, why = choose_tta((64, 256, 256), 3, [32, 32, 32], 2, 0.1, train_seconds=7 * predict_s / TTA_SHARE - 1)
    assert not off and why.startswith("test-time augmentation off") and "over 50% of ~211 s" in why
    assert choose_tta((64, 256, 256), 3, [32, 32, 32], 2, None, 100.0) == (False, "test-time augmentation off: "
                                                                          "prediction speed not measured")
