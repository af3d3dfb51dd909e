"""Denoising engine: blind-spot masking, planning and input checks, stop/resume, prediction, a quick N2V run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dlorch.core.engine.denoise import (
    DenoisingPlan,
    NoHooks,
    load_denoiser,
    plan_denoising,
    predict_denoising,
    train_denoising,
)
from dlorch.core.engine.denoise.blindspot import blindspot_batch, masked_mse
from dlorch.core.engine.denoise.data import TrainBatches, choose_holdout
from dlorch.core.engine.denoise.intensity import mean_std
from dlorch.core.engine.denoise.module import CKPT_KEY
from dlorch.core.engine.denoise.plan import derive_denoising_plan
from dlorch.core.engine.denoise.posterior import estimate_noise_var, local_mean, posterior_mean
from dlorch.core.engine.denoise.predict import denoise_with_details
from dlorch.core.engine.device import detect_runtime
from dlorch.core.engine.inputs import check_denoising_inputs
from dlorch.core.engine.runcontrol import read_run_state

from .conftest import AbandoningHooks, RecordingHooks


def make_noisy(shape=(2, 48, 48), sigma=0.4, offset=0.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blobs and stripes plus Gaussian noise: (noisy float32, clean float32)."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    clean = np.empty(shape, np.float32)
    for k in range(z):
        img = 0.6 * np.sin(yy / (4 + k)) * np.cos(xx / 6)
        for _ in range(3):
            cy, cx, r = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(4, 9)
            img += ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        clean[k] = img + offset
    return clean + rng.normal(0, sigma, shape).astype(np.float32), clean


def fast_plan(image, target=None, *, epochs=2, steps=4, mode=None, **update) -> DenoisingPlan:
    """The pure planning rules (no step-time measurement), shrunk to a tiny network and a few steps."""
    stack, target_stack, mode = check_denoising_inputs(image, target, mode)
    stats = mean_std(stack)
    plan = derive_denoising_plan(
        image_shape=stack.shape,
        mode=mode,
        input_stats=stats,
        target_stats=stats if target_stack is None else mean_std(target_stack),
        runtime=detect_runtime(),
        step_seconds=None,
        eval_seconds=None,
        epochs=epochs,
    )
    small = {"steps_per_epoch": steps, "batch_size": 4, "filters": [8, 16, 32], "patch_size": [32, 32]}
    return plan.model_copy(update={**small, **update})


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return float(10 * np.log10(data_range**2 / np.mean((a.astype(np.float64) - b) ** 2)))


# --- blind-spot masking -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 1, 40, 37), (2, 1, 16, 20, 18)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_masked_pixels_own_value_never_reaches_the_network_input(shape, seed):
    # Every pixel has a distinct value, so a value's presence anywhere in the input is a leak.
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    x_in, mask = blindspot_batch(x, cell=7 if len(shape) == 4 else 4, radius=2 if len(shape) == 4 else 1,
                                 gen=torch.Generator().manual_seed(seed))
    hidden = set(x[mask.expand_as(x) > 0].tolist())
    assert hidden, "something must be masked"
    assert hidden.isdisjoint(x_in.flatten().tolist())
    # Unmasked pixels are untouched; masked ones hold a value of another pixel.
    keep = mask.expand_as(x) == 0
    assert torch.equal(x_in[keep], x[keep])
    assert set(x_in[~keep].tolist()) <= set(x.flatten().tolist())


def test_replacements_come_from_the_window_and_masked_pixels_are_spread():
    x = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 1, 64, 64)
    x_in, mask = blindspot_batch(x, cell=7, radius=2, gen=torch.Generator().manual_seed(5))
    b, _, ys, xs = torch.nonzero(mask, as_tuple=True)
    src = x_in[b, 0, ys, xs].long() - b * 64 * 64  # the value is the source's flat index
    sy, sx = src // 64, src % 64
    assert ((sy - ys).abs() <= 2).all() and ((sx - xs).abs() <= 2).all()
    assert ((sy != ys) | (sx != xs)).all()
    # About 1/49 of the pixels, no two masked pixels of a patch within each other's window.
    assert 0.015 < mask.mean().item() < 0.025
    for k in range(2):
        pts = torch.nonzero(mask[k, 0]).float()
        dist = torch.cdist(pts, pts, p=float("inf")) + torch.eye(len(pts)) * 100
        assert dist.min() > 2


def test_training_batches_score_masked_pixels_against_their_original_noisy_value():
    noisy, _ = make_noisy((2, 48, 48))
    data = TrainBatches(noisy[:, :32], None, (32, 32), batch=3, steps=2, seed=0, n2v=(7, 2))
    x, y, weight = data[0]
    assert x.shape == y.shape == weight.shape == (3, 1, 32, 32)
    m = weight > 0
    assert m.any() and not torch.equal(x[m], y[m])  # inputs at masked pixels were replaced
    assert torch.equal(x[~m], y[~m])  # the target is the un-masked patch itself
    x2, y2, w2 = data[0]  # batches are a function of (seed, epoch, index)
    assert torch.equal(x, x2) and torch.equal(w2, weight)


def test_the_loss_is_taken_on_masked_pixels_only():
    pred = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = torch.randn(2, 1, 16, 16)
    weight = torch.zeros(2, 1, 16, 16)
    weight[0, 0, 3, 4] = weight[1, 0, 10, 2] = 1
    loss = masked_mse(pred, target, weight)
    expected = ((pred - target)[weight > 0] ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (pred.grad[weight == 0] == 0).all() and (pred.grad[weight > 0] != 0).all()
    # Garbage at unscored pixels changes neither the loss nor its gradient.
    bad = pred.detach().clone()
    bad[weight == 0] = float("nan")
    bad.requires_grad_(True)
    loss2 = masked_mse(bad, target, weight)
    loss2.backward()
    assert torch.allclose(loss2, expected) and torch.isfinite(bad.grad).all()


def test_a_patch_too_small_for_the_window_is_refused():
    with pytest.raises(ValueError, match="too small"):
        blindspot_batch(torch.zeros(1, 1, 4, 4), cell=7, radius=2, gen=torch.Generator())


# --- posterior step -----------------------------------------------------------------------------


def test_the_noise_level_is_estimated_from_the_residual_and_ignores_constant_padding():
    rng = np.random.default_rng(0)
    _, clean = make_noisy((2, 96, 96))
    noisy = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32)
    blurred = local_mean(clean, 1.0)  # a prediction that misses some structure
    est = math.sqrt(estimate_noise_var(noisy, blurred))
    assert 0.2 < est < 0.36, est
    # A zero-padded frame (no noise, perfectly predicted) must not fake a zero noise floor.
    pad = ((0, 0), (32, 32), (32, 32))
    est_padded = math.sqrt(estimate_noise_var(np.pad(noisy, pad), np.pad(blurred, pad)))
    assert abs(est_padded - est) < 0.05 * est


def test_the_posterior_keeps_what_the_prediction_misses_and_trusts_it_where_it_is_right():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:64, :128].astype(np.float32)
    clean = np.where(xx < 64, 0.0, np.sin(xx * 2.5) * 1.5).astype(np.float32)[None]  # flat | fine stripes
    noisy = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32)
    predicted = np.zeros_like(clean)  # right on the left half, misses the stripes on the right
    out = posterior_mean(noisy, predicted, noise_var=0.09)
    mse = lambda a, part: float(np.mean((a[..., part] - clean[..., part]) ** 2))  # noqa: E731
    left, right = slice(8, 56), slice(72, 120)
    assert mse(out, left) < 0.3 * mse(noisy, left)  # mostly the prediction where it explains the data
    assert mse(out, right) < 0.3 * mse(predicted, right)  # mostly the data where the prediction misses
    assert out.dtype == np.float32 and np.array_equal(posterior_mean(noisy, noisy, 0.09), noisy)


# --- planning and input checks ------------------------------------------------------------------


def test_automatic_plan_is_n2v_json_serialisable_and_explains_itself():
    noisy, _ = make_noisy((1, 40, 40))
    plan = plan_denoising(noisy[0], epochs=3)
    assert plan.mode == "n2v" and plan.epochs == 3 and plan.spatial_dims == 2
    assert plan.blindspot_cell and plan.step_seconds and plan.step_seconds > 0
    assert DenoisingPlan.model_validate(json.loads(plan.model_dump_json())) == plan
    text = " ".join(plan.reasons)
    for word in ("patch", "blind spot", "lr", "epochs", "batch", "widths"):
        assert word in text


def test_a_target_means_care_unless_the_caller_says_n2n():
    noisy, clean = make_noisy((1, 40, 40))
    assert check_denoising_inputs(noisy, clean, None)[2] == "care"
    assert check_denoising_inputs(noisy, noisy + 1, "n2n")[2] == "n2n"
    assert fast_plan(noisy, clean).blindspot_cell is None


def test_validation_holds_out_slices_of_a_stack_and_rows_of_a_single_image():
    assert choose_holdout((30, 512, 512)) == ([7, 14, 22], 0)
    assert choose_holdout((1, 512, 512)) == ([], 80)
    assert choose_holdout((1, 24, 24)) == ([], 0)


@pytest.mark.parametrize(
    "image, target, kwargs, message",
    [
        (np.zeros((2, 3, 16, 16)), None, {}, "drop channel/time axes"),
        (np.zeros((32, 32)), np.zeros((32, 31)), {}, "same grid"),
        (np.zeros((32, 32)), None, {"mode": "n2n"}, "pass target="),
        (np.zeros((32, 32)), None, {"mode": "care"}, "pass target="),
        (np.zeros((32, 32)), np.zeros((32, 32)), {"mode": "n2v"}, "drop target"),
        (np.zeros((32, 32)), None, {"mode": "bm3d"}, "mode must be one of"),
        (np.zeros((4, 40)), None, {}, "at least 8x8"),
        (np.full((32, 32), np.nan), None, {}, "nan_to_num"),
        (np.zeros((32, 32)), None, {"epochs": 0}, "epochs must be >= 1"),
        (np.zeros((32, 32)), None, {"time_budget": 0}, "time_budget must be > 0"),
    ],
)
def test_bad_inputs_raise_a_one_line_value_error_naming_the_fix(image, target, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_denoising(image, target, **kwargs)
    assert "\n" not in str(info.value)


def test_training_refuses_an_image_the_plan_was_not_made_for(tmp_path):
    noisy, _ = make_noisy((2, 48, 48))
    plan = fast_plan(noisy)
    with pytest.raises(ValueError, match="re-plan"):
        train_denoising(noisy[:, :40], None, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks())
    with pytest.raises(ValueError, match="drop target"):
        train_denoising(noisy, noisy, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks())


# --- training: checkpoints, stop and resume -----------------------------------------------------


def test_an_exception_from_should_stop_abandons_the_epoch_at_once_without_a_checkpoint(tmp_path):
    class LeaseLost(Exception):
        pass

    noisy, _ = make_noisy((2, 48, 48))
    hooks = AbandoningHooks(LeaseLost(), at=2)
    with pytest.raises(LeaseLost):
        train_denoising(noisy, None, fast_plan(noisy, epochs=2, steps=6), workdir=tmp_path, resume_from=None, hooks=hooks)
    assert hooks.polls == 2 and hooks.checkpoints == [] and not list(tmp_path.glob("*.ckpt"))


def test_stop_then_resume_trains_exactly_the_planned_epochs(tmp_path):
    noisy, _ = make_noisy((2, 48, 48))
    plan = fast_plan(noisy, epochs=3)
    first = RecordingHooks(stop_after_checkpoints=1)
    result = train_denoising(noisy, None, plan, workdir=tmp_path / "a", resume_from=None, hooks=first)
    # The stop request is seen during epoch 2 (after one checkpoint); epoch 2 is finished first.
    assert result.stopped_by == "stop_request" and result.epochs_done == 2
    assert [p.epochs_done for _, p in first.checkpoints] == [1, 2]
    assert result.checkpoint == first.checkpoints[-1][0]

    second = RecordingHooks()
    result2 = train_denoising(noisy, None, plan, workdir=tmp_path / "b", resume_from=result.checkpoint, hooks=second)
    assert result2.stopped_by == "epochs" and result2.epochs_done == 3
    assert [p.epochs_done for _, p in second.checkpoints] == [3]
    assert first.polls + second.polls == plan.epochs * plan.steps_per_epoch  # one poll per batch

    third = RecordingHooks()
    result3 = train_denoising(noisy, None, plan, workdir=tmp_path / "c", resume_from=result2.checkpoint, hooks=third)
    assert result3.epochs_done == 3 and result3.stopped_by == "epochs" and third.polls == 0


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    noisy, _ = make_noisy((2, 48, 48))
    plan = fast_plan(noisy, epochs=2, steps=3)
    straight = train_denoising(noisy, None, plan, workdir=tmp_path / "s", resume_from=None, hooks=NoHooks())
    half = train_denoising(
        noisy, None, plan, workdir=tmp_path / "h", resume_from=None, hooks=RecordingHooks(stop_after_checkpoints=0)
    )
    assert half.epochs_done == 1
    resumed = train_denoising(noisy, None, plan, workdir=tmp_path / "r", resume_from=half.checkpoint, hooks=NoHooks())
    a = torch.load(straight.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(resumed.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_time_budget_cuts_the_epoch_and_is_kept_across_resumes(tmp_path):
    noisy, _ = make_noisy((2, 48, 48))
    plan = fast_plan(noisy, epochs=5, steps=20, time_budget_s=1e-3)
    hooks = RecordingHooks()
    result = train_denoising(noisy, None, plan, workdir=tmp_path / "a", resume_from=None, hooks=hooks)
    assert result.stopped_by == "time_budget" and result.epochs_done == 1
    assert hooks.polls < plan.steps_per_epoch  # the epoch was cut short
    assert read_run_state(result.checkpoint)["train_seconds"] >= 1e-3
    again = RecordingHooks()
    result2 = train_denoising(noisy, None, plan, workdir=tmp_path / "b", resume_from=result.checkpoint, hooks=again)
    assert result2.stopped_by == "time_budget" and again.polls == 0 and result2.epochs_done == 1


# --- prediction ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def n2v_run(tmp_path_factory):
    """A short Noise2Void training on a synthetic stack with a negative offset: (checkpoint, noisy, clean)."""
    noisy, clean = make_noisy((6, 64, 64), sigma=0.4, offset=-1000.0, seed=1)
    plan = fast_plan(noisy, epochs=3, steps=30, batch_size=8, lr=3e-3)
    workdir = tmp_path_factory.mktemp("n2v")
    result = train_denoising(noisy, None, plan, workdir=workdir, resume_from=None, hooks=NoHooks())
    return result.checkpoint, noisy, clean


def test_the_checkpoint_alone_rebuilds_the_model_with_weights_only_loading(n2v_run):
    checkpoint, _, _ = n2v_run
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert ckpt[CKPT_KEY]["plan"]["mode"] == "n2v" and ckpt[CKPT_KEY]["best_state"]
    assert read_run_state(checkpoint)["epochs_done"] == 3
    net, plan = load_denoiser(checkpoint)
    assert not net.training and plan.epochs == 3


def test_floats_stay_floats_with_the_input_shape_and_no_clipping(n2v_run):
    checkpoint, noisy, _ = n2v_run
    for img in (noisy, noisy[0], noisy[:2].astype(np.float64)):
        out = predict_denoising(checkpoint, img)
        assert out.shape == img.shape and out.dtype == np.float32
    out = predict_denoising(checkpoint, noisy)
    # Values around -1000 come back around -1000: nothing was clipped to [0, 1] or rounded.
    assert out.max() < -990 and abs(float(out.mean() - noisy.mean())) < 0.5
    assert not np.array_equal(out, np.round(out))
    ints = predict_denoising(checkpoint, np.zeros((40, 40), np.int16))  # any dtype in, float32 out
    assert ints.dtype == np.float32 and ints.shape == (40, 40)


def test_tiled_prediction_equals_a_whole_image_pass_when_the_image_fits(n2v_run, monkeypatch):
    checkpoint, noisy, _ = n2v_run
    model = load_denoiser(checkpoint)
    monkeypatch.setenv("DLORCH_PRECISION", "32")  # the windows' arithmetic, to float32's tolerance
    # The network's output (the posterior step is per-pixel arithmetic on top of it).
    whole = denoise_with_details(None, noisy, model=model, roi=[64, 64], posterior=False).image
    net, plan = model
    with torch.no_grad():
        x = torch.from_numpy((noisy[:, None] - np.float32(plan.input_mean)) / np.float32(plan.input_std))
        direct = net(x)[:, 0].numpy() * plan.target_std + plan.target_mean
    np.testing.assert_allclose(whole, direct, atol=1e-3)
    tiled = denoise_with_details(None, noisy, model=model, roi=[32, 32], posterior=False).image  # 3x3 windows
    err = np.abs(tiled - whole)
    assert err.mean() < 0.05 * noisy.std() and np.median(err) < 0.02 * noisy.std()
    # bf16 autocast (GPUs, CPUs with bf16 units) rounds the products, not the output: still floats, near float32's.
    monkeypatch.setenv("DLORCH_PRECISION", "bf16")
    half = denoise_with_details(None, noisy, model=model, roi=[64, 64], posterior=False).image
    err = np.abs(half - whole) / noisy.std()
    print(f"bf16 against float32, in noise std: mean {err.mean():.4f}, max {err.max():.4f}")
    assert half.dtype == np.float32 and not np.array_equal(half, whole)
    assert err.mean() < 0.01 and err.max() < 0.1 and not np.allclose(half, np.round(half))


def test_a_block_denoised_alone_equals_the_whole_pass_over_its_core(n2v_run):
    from dlorch.core.blocks import plan_blocks
    from dlorch.core.engine.denoise.predict import network_output, region_for, volume_noise_var

    checkpoint, noisy, _ = n2v_run
    net, plan = load_denoiser(checkpoint)
    plan = plan.model_copy(update={"infer_roi": [32, 32], "posterior": True})  # windows over block borders
    model, image = (net, plan), np.tile(noisy, (1, 2, 3))  # (6, 128, 192)
    whole = denoise_with_details(None, image, model=model)
    noise_var = volume_noise_var(image, network_output(model, image), plan)  # what the whole pass estimated
    assert whole.noise_std == pytest.approx(noise_var**0.5 * plan.input_std)
    blocks = plan_blocks(image.shape, (2, 32, 32), (0, 0, 0), 4000, lambda core: region_for(plan, image.shape, core))
    assert len(blocks) > 12 and all(b.read[1][0] <= max(0, b.core[1][0] - 12) for b in blocks)
    stitched = np.full_like(whole.image, np.nan)
    for b in blocks:
        part = denoise_with_details(None, image[b.read_slices()], model=model, noise_var=noise_var,
                                    volume_shape=image.shape, origin=tuple(a for a, _ in b.read))
        stitched[b.core_slices()] = part.image[b.crop()]
    # The same windows, blended in the same order, and the posterior's local means over the same pixels.
    np.testing.assert_array_equal(stitched, whole.image)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a dlorch denoising checkpoint"):
        predict_denoising(path, np.zeros((16, 16), np.float32))


@pytest.mark.parametrize("mode", ["care", "n2n"])
def test_supervised_modes_train_on_every_pixel_and_answer_on_the_targets_scale(mode, tmp_path):
    noisy, clean = make_noisy((2, 48, 48), seed=2)
    # CARE: a clean target on another intensity scale; N2N: a second noisy acquisition.
    target = clean * 100 + 5 if mode == "care" else make_noisy((2, 48, 48), seed=2)[0]
    plan = fast_plan(noisy, target, epochs=1, steps=3, mode=mode)
    assert plan.mode == mode and plan.blindspot_cell is None
    data = TrainBatches(noisy, target, (32, 32), batch=2, steps=1, seed=0, swap=mode == "n2n")
    assert (data[0][2] == 1).all()  # every pixel is scored
    result = train_denoising(noisy, target, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks())
    out = predict_denoising(result.checkpoint, noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    if mode == "care":
        assert abs(float(out.mean()) - float(target.mean())) < 0.5 * float(target.std())


def test_a_quick_noise2void_run_improves_psnr(n2v_run):
    checkpoint, noisy, clean = n2v_run
    out = predict_denoising(checkpoint, noisy)
    span = float(clean.max() - clean.min())
    before, after = psnr(noisy, clean, span), psnr(out, clean, span)
    print(f"PSNR noisy {before:.2f} dB -> denoised {after:.2f} dB")
    assert after > before + 2.0


# --- 3D -----------------------------------------------------------------------------------------


def make_noisy_volume(shape=(24, 48, 48), sigma=0.4, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Balls in a volume (isotropic structure) plus Gaussian noise: (noisy float32, clean float32)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    clean = 0.5 * np.sin(zz / 5) * np.cos(yy / 6) * np.sin(xx / 7)
    for _ in range(8):
        c, r = rng.uniform(6, np.array(shape) - 6), rng.uniform(4, 8)
        clean = clean + ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r**2)
    clean = clean.astype(np.float32)
    return clean + rng.normal(0, sigma, shape).astype(np.float32), clean


def test_a_near_isotropic_volume_is_planned_in_3d_and_serial_sections_in_2d():
    noisy, _ = make_noisy_volume((32, 48, 48))
    plan = plan_denoising(noisy, epochs=1)
    assert plan.spatial_dims == 3 and len(plan.patch_size) == 3 and len(plan.infer_roi) == 3
    assert plan.val_slices == [] and plan.val_rows > 0  # a volume keeps its slices together
    assert plan.blindspot_cell == 4 and any("4x4x4 cell" in r for r in plan.reasons)
    sections = plan_denoising(make_noisy((20, 48, 48))[0], epochs=1)  # unrelated slices: 2D
    assert sections.spatial_dims == 2 and len(sections.patch_size) == 2


def test_noise2void_in_3d_improves_psnr_and_tiles_like_a_whole_pass(tmp_path, monkeypatch):
    noisy, clean = make_noisy_volume()
    stats = mean_std(noisy)
    plan = derive_denoising_plan(image_shape=noisy.shape, mode="n2v", input_stats=stats, target_stats=stats,
                                 runtime=detect_runtime(), step_seconds=None, eval_seconds=None, epochs=3,
                                 spatial_dims=3)
    plan = plan.model_copy(update={"steps_per_epoch": 30, "batch_size": 4, "filters": [8, 16, 32],
                                   "patch_size": [16, 32, 32], "lr": 3e-3})
    data = TrainBatches(noisy, None, (16, 32, 32), batch=2, steps=1, seed=0, n2v=(4, 2))
    x, y, weight = data[0]
    assert x.shape == (2, 1, 16, 32, 32) and 0 < float(weight.mean()) < 0.05
    result = train_denoising(noisy, None, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks())
    model = load_denoiser(result.checkpoint)
    out = denoise_with_details(None, noisy, model=model)
    span = float(clean.max() - clean.min())
    before, after = psnr(noisy, clean, span), psnr(out.image, clean, span)
    print(f"3D PSNR noisy {before:.2f} dB -> denoised {after:.2f} dB (network alone {psnr(out.network_output, clean, span):.2f})")
    assert after > before + 1.5
    monkeypatch.setenv("DLORCH_PRECISION", "32")  # trained as the device chose; the windows compared in float32
    whole = denoise_with_details(None, noisy, model=model, posterior=False).image
    net, plan = model
    with torch.no_grad():
        x = torch.from_numpy((noisy[None, None] - np.float32(plan.input_mean)) / np.float32(plan.input_std))
        direct = net(x)[0, 0].numpy() * plan.target_std + plan.target_mean
    np.testing.assert_allclose(whole, direct, atol=1e-3)
    tiled = denoise_with_details(None, noisy, model=model, roi=[16, 32, 32], posterior=False).image
    assert np.median(np.abs(tiled - whole)) < 0.05 * noisy.std()
