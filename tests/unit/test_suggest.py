"""Where to correct next: the candidates' disagreement and the ranking of tiles."""

import numpy as np
import pytest

from dlorch.core.engine.suggest import disagreement, rank_tiles


def test_disagreement_is_the_share_of_candidates_off_the_majority():
    a = np.array([[1, 1, 2], [2, 1, 1]], np.uint8)
    b = np.array([[1, 2, 2], [2, 1, 2]], np.uint8)
    c = np.array([[1, 2, 1], [2, 3, 3]], np.uint8)
    d = disagreement([a, b, c])
    assert d.dtype == np.float32 and d.shape == a.shape
    np.testing.assert_allclose(d, [[0, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], atol=1e-6)
    assert not disagreement([a]).any() and not disagreement([a, a.copy()]).any()
    assert disagreement([a, b])[0, 1] == 0.5
    with pytest.raises(ValueError, match="at least one"):
        disagreement([])
    with pytest.raises(ValueError, match="differ in shape"):
        disagreement([a, a[:1]])


def test_tiles_are_ranked_by_need_and_labelled_ones_skipped():
    d = np.zeros((2, 300, 260), np.float32)
    d[0, 10:20, 10:20] = 1.0  # a small disagreement in slice 0's first tile
    d[1, 140:250, 140:250] = 1.0  # a large one in slice 1
    d[1, 260:300, 0:128] = 0.5  # the bottom edge tile (44 rows): half of it at 0.5
    tiles = rank_tiles(d, tile=128, k=8)
    assert [(t["slice"], t["y"], t["x"]) for t in tiles] == [(1, 128, 128), (1, 256, 0), (0, 0, 0)]
    top = tiles[0]
    assert (top["h"], top["w"]) == (128, 128) and top["score"] == pytest.approx(110 * 110 / 128**2)
    assert tiles[1]["h"] == 44 and tiles[1]["score"] == pytest.approx(0.5 * 40 / 44)
    assert len(rank_tiles(d, tile=128, k=1)) == 1
    # The user labelled all of slice 1's top tile: it is skipped; a half-labelled tile is scored on the rest.
    labelled = np.zeros(d.shape, np.uint8)
    labelled[1, 128:256, 128:256] = 2
    labelled[0, 0:128, 64:128] = 1
    tiles = rank_tiles(d, tile=128, labelled=labelled)
    assert [(t["slice"], t["y"], t["x"]) for t in tiles] == [(1, 256, 0), (0, 0, 0)]
    assert tiles[-1]["score"] == pytest.approx(100 / (128 * 64))


def test_low_confidence_adds_to_the_need_and_2d_maps_work():
    d = np.zeros((256, 256), np.float32)
    conf = np.full((256, 256), 255, np.uint8)
    conf[200:, 200:] = 128  # unsure in the bottom-right tile, though the candidates agree
    d[0:10, 0:10] = 1.0
    tiles = rank_tiles(d, confidence=conf, tile=128)
    assert [(t["slice"], t["y"], t["x"]) for t in tiles] == [(0, 128, 128), (0, 0, 0)]
    assert tiles[0]["score"] == pytest.approx(56 * 56 * (1 - 128 / 255) / 2 / 128**2, rel=1e-5)
    assert rank_tiles(np.zeros((64, 64)), tile=32) == []  # nothing to correct
    with pytest.raises(ValueError, match="confidence shape"):
        rank_tiles(d, confidence=conf[:10])
    with pytest.raises(ValueError, match="2D"):
        rank_tiles(np.zeros(5))
