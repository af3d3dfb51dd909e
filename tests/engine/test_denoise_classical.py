"""The classical half of whole-image denoising: noise level, collaborative filtering, the SURE blend."""

from __future__ import annotations

import numpy as np
import pytest

from dlorch.core.engine.denoise.collab import collab_filter
from dlorch.core.engine.denoise import noiselevel
from dlorch.core.engine.denoise.noiselevel import estimate_sigma
from dlorch.core.engine.denoise.sure import blend_with_collab, stack_sigma, sure_weight


def scene(size: int = 96, seed: int = 0) -> np.ndarray:
    """A clean test picture: discs and bars of several grey levels on a gentle ramp (0-255 scale)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    img = 60 + 0.4 * xx
    for _ in range(6):
        cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 14)]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255)
    img[:, size // 3 : size // 3 + 4] += 80
    img[size // 2 : size // 2 + 3, :] -= 50
    return img


def psnr(a: np.ndarray, clean: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((np.asarray(a, np.float64) - clean) ** 2)))


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])  # below ~15 a busy 128x128 picture adds 10-40%
def test_the_noise_level_is_estimated_within_ten_percent(sigma):
    clean = scene(128)
    noisy = clean + np.random.default_rng(1).normal(0, sigma, clean.shape)
    assert estimate_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    ramp = np.add.outer(np.arange(64.0), 2 * np.arange(64.0))
    assert estimate_sigma(ramp) < 1e-3  # no noise: nothing found
    assert estimate_sigma(np.zeros((5, 5))) == 0.0  # too small for a 7x7 patch
    stack = np.stack([noisy, noisy[::-1], noisy[:, ::-1]])
    assert stack_sigma(stack) == pytest.approx(sigma, rel=0.1)


def test_collaborative_filtering_gains_much_over_the_noisy_input():
    clean = scene(96)
    noisy = clean + np.random.default_rng(2).normal(0, 25.0, clean.shape)
    out = collab_filter(noisy, 25.0)
    print(f"noisy {psnr(noisy, clean):.2f} dB -> collaborative filtering {psnr(out, clean):.2f} dB")
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert psnr(out, clean) > psnr(noisy, clean) + 8.0
    # Told a much smaller noise it leaves most of the noise in: the sigma is what it works with.
    assert psnr(collab_filter(noisy, 2.0), clean) < psnr(out, clean) - 4.0


def test_texture_over_half_the_image_does_not_inflate_the_noise_level():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    clean = np.full((512, 512), 120.0)
    clean[:, :256] += gaussian_filter(rng.normal(0, 60, (512, 256)), 0.7)  # fine texture, like grass
    noisy = clean + rng.normal(0, 25.0, clean.shape)
    assert noiselevel._whole(noisy) > 25.0 * 1.03  # read whole, the texture counts as noise
    assert estimate_sigma(noisy) == pytest.approx(25.0, rel=0.015)  # the smooth tiles' reading


def test_noise_that_grows_with_the_signal_is_given_its_overall_std():
    rng = np.random.default_rng(4)
    rate = np.where(np.arange(512) < 256, 2.0, 60.0)[None, :] * np.ones((512, 1))  # a dark and a bright half
    counts = rng.poisson(rate) * 4.0
    overall = float(np.std(counts - 4.0 * rate))
    # the dark tiles alone read 5.7: a filter told that would leave the bright half's noise (31) in
    assert estimate_sigma(counts) == pytest.approx(overall, rel=0.05)


def test_sure_estimates_the_filters_error_without_the_clean_image():
    clean = scene(96)
    noisy = (clean + np.random.default_rng(0).normal(0, 25.0, clean.shape)).astype(np.float32)
    f = collab_filter(noisy, 25.0)
    # Monte-Carlo divergence, averaged over four probes: one probe of a 96 x 96 image scatters by +-20 %
    # (a 512 x 512 slice, as the engine scores, by 28 times less in variance)
    divs = []
    for seed in range(7, 11):
        b = np.random.default_rng(seed).standard_normal(noisy.shape).astype(np.float32)
        divs.append(float(np.sum(b * (collab_filter(noisy + 1.25 * b, 25.0) - f))) / 1.25)
    sure = np.mean((noisy - f) ** 2) - 625.0 + 2 * 625.0 * np.mean(divs) / noisy.size
    true = np.mean((f - clean) ** 2)
    print(f"SURE {sure:.1f} against the true mean squared error {true:.1f}")
    assert sure == pytest.approx(true, rel=0.15)


def test_sure_picks_the_better_estimate_without_the_clean_image():
    clean = scene(96)
    rng = np.random.default_rng(3)
    noisy = clean + rng.normal(0, 20.0, clean.shape)
    var, n = 400.0, noisy.size
    # The noisy image itself (divergence N) against a fixed guess that ignores the data (divergence 0).
    assert sure_weight(noisy, noisy, clean, n, 0.0, var) == pytest.approx(1.0, abs=0.05)
    assert sure_weight(noisy, clean, noisy, 0.0, n, var) == pytest.approx(0.0, abs=0.05)
    assert sure_weight(noisy, noisy, noisy, n, n, var) == 0.0  # identical candidates: keep the network's


def test_the_blend_follows_whichever_of_network_and_filter_is_better():
    clean = np.stack([scene(80, 4), scene(80, 5)])
    noisy = (clean + np.random.default_rng(4).normal(0, 25.0, clean.shape)).astype(np.float32)
    # A "network" that does nothing: the filter takes over.
    lazy = blend_with_collab(noisy, noisy, lambda s: s)
    assert min(lazy.weights) > 0.9 and lazy.sigma == pytest.approx(25.0, rel=0.1)
    assert psnr(lazy.image, clean) > psnr(noisy, clean) + 7.0
    # A "network" that knows the answer whatever it is shown (divergence 0): it is kept.
    oracle = blend_with_collab(noisy, clean.astype(np.float32), lambda s: clean.astype(np.float32))
    assert max(oracle.weights) < 0.25  # SURE on 6,400 pixels is itself noisy: near 0, not at it
    assert psnr(oracle.image, clean) > psnr(lazy.image, clean) + 3.0


def test_a_long_stack_is_scored_on_a_few_slices_and_filtered_once_per_slice(monkeypatch):
    import dlorch.core.engine.denoise.sure as sure

    calls = []
    real = sure.collab_filter
    monkeypatch.setattr(sure, "collab_filter", lambda y, sigma: calls.append(1) or real(y, sigma))
    clean = np.stack([scene(64, z) for z in range(7)])
    noisy = (clean + np.random.default_rng(5).normal(0, 25.0, clean.shape)).astype(np.float32)
    lazy = blend_with_collab(noisy, noisy, lambda s: s)
    assert len(calls) == 2 * sure.SURE_SLICES + (7 - sure.SURE_SLICES)  # two runs per scored slice, one per other
    assert min(lazy.weights) > 0.9 and psnr(lazy.image, clean) > psnr(noisy, clean) + 7.0
    calls.clear()
    oracle = blend_with_collab(noisy, clean.astype(np.float32), lambda s: clean.astype(np.float32))
    if np.median(oracle.weights) == 0.0:  # the network wins: unscored slices are never filtered
        assert len(calls) == 2 * sure.SURE_SLICES
    assert psnr(oracle.image, clean) > psnr(lazy.image, clean) + 3.0


def test_a_slicewise_network_is_probed_on_the_scored_slices_only_with_the_same_blend():
    from scipy.ndimage import gaussian_filter

    clean = np.stack([scene(64, z) for z in range(6)])
    noisy = (clean + np.random.default_rng(6).normal(0, 25.0, clean.shape)).astype(np.float32)
    seen = []

    def smooth(s):  # a stand-in network that denoises each slice on its own
        seen.append(len(s))
        return np.stack([gaussian_filter(x, 1.0) for x in s]).astype(np.float32)

    whole = blend_with_collab(noisy, smooth(noisy), smooth)
    seen.clear()
    scored = blend_with_collab(noisy, smooth(noisy), smooth, slicewise=True)
    assert seen[-1] == 3  # the perturbed copy of the three scored slices, not all six
    assert whole.weights == scored.weights
    np.testing.assert_array_equal(whole.image, scored.image)


def test_the_first_pass_wavelet_is_bior15_and_inverts_exactly():
    import torch

    from dlorch.core.engine.denoise.collab import _bior15

    fwd, inv, norms = _bior15()
    assert torch.allclose(inv @ fwd, torch.eye(8), atol=1e-6)
    # pywt.wavedec(e_i, "bior1.5", mode="periodization", level=3), concatenated, for the unit vectors e_i
    assert torch.allclose(fwd[1], torch.tensor([0.232019, 0.475087, 0.475087, 0.232019,
                                                -0.232019, -0.475087, -0.475087, -0.232019]), atol=1e-5)
    assert torch.allclose(fwd[2], torch.tensor([0.585938, 0.414063, -0.414063, -0.585938,
                                                -0.085938, 0.085938, -0.085938, 0.085938]), atol=1e-5)
    assert float(norms.min()) == pytest.approx(1.0) and float(norms.max()) == pytest.approx(1.0574, abs=1e-4)


def test_the_wavelet_first_pass_does_better_than_the_dct_one(monkeypatch):
    from dlorch.core.engine.denoise import collab

    clean = scene(96, seed=3)
    noisy = clean + np.random.default_rng(4).normal(0, 25.0, clean.shape)
    bior = psnr(collab.collab_filter(noisy, 25.0), clean)
    monkeypatch.setattr(collab, "STAGE1", "dct")
    dct = psnr(collab.collab_filter(noisy, 25.0), clean)
    print(f"first pass in bior1.5 {bior:.3f} dB, in the DCT {dct:.3f} dB")
    assert bior > dct
