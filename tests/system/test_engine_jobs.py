"""The engine through the CLI on the embedded default: candidates, denoising, a 3D volume end to end."""

import numpy as np
import pytest
import tifffile

from tests.conftest import synthetic_pair
from tests.system.harness import cli_env, dlorch, job_json


def _volume(tmp, shape=(64, 256, 256)):
    """A synthetic 3D stack: bright tubes along Z through a noisy background, strokes on three slices."""
    rng = np.random.default_rng(5)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    truth = np.ones(shape, np.uint8)
    for cy, cx in rng.integers(30, shape[1] - 30, size=(6, 2)):
        truth[(yy - cy - 10 * np.sin(zz / 9)) ** 2 + (xx - cx) ** 2 < 12**2] = 2
    image = (truth * 90.0 + rng.normal(0, 25, shape)).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for z in (3, shape[0] // 2, shape[0] - 4):
        paint = rng.random(shape[1:]) < 0.02
        labels[z][paint] = truth[z][paint]
    np.save(tmp / "vol.npy", image)
    np.save(tmp / "vol_labels.npy", labels)
    return image, truth


def test_candidates_train_side_by_side_and_report_a_table(home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    cp = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1", "--candidates", "4",
                env=cli_env(DLORCH_THREADS=""))
    for variant in ("unet-deep", "unet-shallow-wide", "ce-only", "wide-context"):
        assert variant in cp.stdout
    assert "best:" in cp.stderr
    bad = dlorch("train", "segment", str(img), "--labels", str(lab), "--candidates", "9", check=False)
    assert bad.returncode != 0 and "--candidates takes 1 to 5" in bad.stderr


def test_3d_volume_segment_end_to_end(home, tmp_path):
    # 32 slices (MIN_SLICES_3D is 16) of 128x128: patches of 32x64x64, an eighth of the voxels to predict
    image, truth = _volume(tmp_path, shape=(32, 128, 128))
    out = tmp_path / "seg.tif"
    cp = dlorch("segment", str(tmp_path / "vol.npy"), "--labels", str(tmp_path / "vol_labels.npy"), "-o", str(out),
                "--epochs", "2", timeout=900)
    seg = tifffile.imread(out)
    assert seg.shape == image.shape and seg.dtype == np.uint8
    assert (seg == truth).mean() > 0.9  # 0.95 measured
    tubes = ((seg == 2) & (truth == 2)).sum() / ((seg == 2) | (truth == 2)).sum()
    assert tubes > 0.5  # a real model, not a constant (the tubes are 16% of the voxels; 0.76 measured)
    plan = job_json(cp.stdout.strip().splitlines()[-1])["plan"]
    assert plan["reasons"]
    # The tubes wander slowly along Z: the volume is near isotropic, so it is segmented in 3D.
    assert plan["spatial_dims"] == 3 and len(plan["patch_size"]) == 3
    # Test-time augmentation is on exactly when its 7 extra passes fit in half the training time,
    # which depends on this machine's measured speed; the plan says which it chose and why.
    why = [r for r in plan["reasons"] if r.startswith("test-time augmentation")]
    assert len(why) == 1 and why[0].startswith(f"test-time augmentation {'on' if plan['tta'] else 'off'}: ")


def test_3d_volume_denoise_end_to_end_keeps_floats(home, tmp_path):
    pytest.importorskip("dlorch.core.engine.denoise")
    image, _ = _volume(tmp_path, shape=(32, 128, 128))  # still a volume: denoised in 3D
    image -= 300.0  # a signal below zero must survive: no clipping, no rounding
    np.save(tmp_path / "noisy.npy", image)
    out = tmp_path / "den.tif"
    dlorch("denoise", str(tmp_path / "noisy.npy"), "-o", str(out), "--epochs", "1", timeout=900)
    den = tifffile.imread(out)
    assert den.shape == image.shape and den.dtype == np.float32
    assert den.max() < 0 and not np.allclose(den, np.round(den))
    assert np.abs(den - (image.mean())).mean() < np.abs(image - image.mean()).mean()  # smoother than its input
