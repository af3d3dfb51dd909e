"""Augmentation: image and labels move together, labels keep their classes, unlabelled stays unlabelled."""

import numpy as np
import pytest
import torch

from dlorch.core.engine.segment.augment import AugmentConfig, augment_batch


def _blobs(shape, seed=0):
    """Piecewise-constant labels 0..2 (0 = unlabelled) in big blobs, and an image equal to them."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, [max(2, s // 8) for s in shape])
    labels = coarse
    for ax, s in enumerate(shape):
        labels = np.repeat(labels, -(-s // coarse.shape[ax]), axis=ax)
    labels = labels[tuple(slice(0, s) for s in shape)]
    y = torch.from_numpy(np.stack([labels[None]] * 4).astype(np.int64))
    return y.float(), y


@pytest.mark.parametrize("shape", [(64, 64), (24, 32, 32)])
def test_warps_move_image_and_labels_together_and_keep_the_classes(shape):
    x, y = _blobs(shape)
    warp_only = AugmentConfig(affine_prob=1.0, elastic_prob=1.0, elastic_px=3.0, intensity_scale=0.0,
                              intensity_shift=0.0, noise_std=0.0)
    xa, ya = augment_batch(x, y, warp_only, torch.Generator().manual_seed(1))
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == y.dtype
    assert set(ya.unique().tolist()) <= {0, 1, 2}
    # Nearest-neighbour labels and bilinear image agree except on a thin band along class borders.
    inner = ya > 0
    assert (xa[inner].round() == ya[inner].float()).float().mean() > 0.85
    # It did warp: the labels are none of the exact flips and turns of the originals.
    exact = [torch.rot90(torch.flip(y[0], f), k, (-2, -1)) for k in range(4) for f in ([], [-1], [-2], [-1, -2])]
    assert all(not torch.equal(ya[i], e) for i in range(4) for e in exact)
    # Labels are resampled, not invented: what a zoom-out or a turn pulls in from beyond the patch is
    # unlabelled, so the labelled share may only shrink, and by at most what a 10% zoom loses.
    before, after = (y > 0).float().mean(), (ya > 0).float().mean()
    assert 0.7 * before < after < 1.05 * before


@pytest.mark.parametrize("shape", [(64, 64), (24, 32, 32)])
def test_without_warps_the_result_is_an_exact_flip_or_turn(shape):
    x, y = _blobs(shape, seed=2)
    exact_only = AugmentConfig(affine_prob=0.0, elastic_prob=0.0, intensity_scale=0.0, intensity_shift=0.0,
                               noise_std=0.0)
    xa, ya = augment_batch(x, y, exact_only, torch.Generator().manual_seed(3))
    assert torch.equal(xa.round().long(), ya)  # no resampling: image and labels stay identical
    assert sorted(ya.flatten().tolist()) == sorted(y.flatten().tolist())


def test_same_seed_same_augmentation():
    x, y = _blobs((16, 32, 32))
    cfg = AugmentConfig()
    a = augment_batch(x, y, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(x, y, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
