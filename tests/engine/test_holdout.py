"""Connected components and the stroke-wise validation split."""

from collections import deque

import numpy as np

from dlorch.core.engine.segment.components import label_components_2d, label_strokes
from dlorch.core.engine.segment.holdout import split_strokes


def _bfs_components(mask):
    out = np.zeros(mask.shape, int)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if out[y, x]:
            continue
        n += 1
        out[y, x] = n
        queue = deque([(y, x)])
        while queue:
            a, b = queue.popleft()
            for u in range(max(a - 1, 0), min(a + 2, mask.shape[0])):
                for v in range(max(b - 1, 0), min(b + 2, mask.shape[1])):
                    if mask[u, v] and not out[u, v]:
                        out[u, v] = n
                        queue.append((u, v))
    return out, n


def test_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((rng.integers(1, 25), rng.integers(1, 25))) < rng.random()
        ours, n_ours = label_components_2d(mask)
        ref, n_ref = _bfs_components(mask)
        assert n_ours == n_ref
        assert len(set(zip(ours[mask], ref[mask]))) == n_ref  # the same partition
        assert np.all((ours > 0) == mask)


def test_diagonal_pixels_are_one_stroke_and_slices_are_separate():
    labels = np.zeros((2, 5, 5), np.uint8)
    labels[0, 0, 0] = labels[0, 1, 1] = labels[0, 2, 2] = 1
    labels[1, 0, 0] = 1
    ids, classes = label_strokes(labels)
    assert len(classes) - 1 == 2
    assert ids[0, 0, 0] == ids[0, 2, 2] != ids[1, 0, 0]


def _stroke_labels(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((3, 64, 64), np.uint8)
    for z in range(3):
        for i in range(6):
            y, x = rng.integers(0, 58, 2)
            labels[z, y : y + 3, x : x + rng.integers(2, 7)] = 1 + (i % 2)
    return labels


def test_split_keeps_every_stroke_whole_and_on_one_side():
    labels = _stroke_labels()
    split = split_strokes(labels, val_fraction=0.3, seed=0)
    assert split.val_strokes > 0
    assert np.array_equal(split.train + split.val, labels)
    assert not np.any((split.train > 0) & (split.val > 0))
    ids, _ = label_strokes(labels)
    for s in np.unique(ids[ids > 0]):
        in_val = split.val[ids == s] > 0
        assert in_val.all() or not in_val.any(), f"stroke {s} was cut in two"


def test_split_leaves_every_class_in_training_and_is_seeded():
    labels = _stroke_labels(1)
    a = split_strokes(labels, 0.3, seed=5)
    b = split_strokes(labels, 0.3, seed=5)
    assert np.array_equal(a.val, b.val)
    for c in (1, 2):
        assert (a.train == c).sum() >= 0.5 * (labels == c).sum()


def test_a_class_with_few_strokes_is_not_held_back():
    labels = np.zeros((1, 32, 32), np.uint8)
    labels[0, 1:3, 1:3] = 1  # class 1: a single stroke
    for i in range(5):
        labels[0, 10 + 4 * i : 12 + 4 * i, 10:14] = 2
    split = split_strokes(labels, 0.3, seed=0)
    assert (split.val == 1).sum() == 0 and (split.val == 2).sum() > 0


def test_in_a_volume_a_stroke_through_several_slices_is_one_stroke():
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[0:3, 4:8, 4:8] = 1  # one stroke painted through slices 0-2
    labels[3, 4:8, 4:8] = 2  # another class right below: not the same stroke
    labels[1, 20:24, 20:24] = 1  # and a separate one
    per_slice, _ = label_strokes(labels)
    linked, classes = label_strokes(labels, link_slices=True)
    assert len(np.unique(per_slice[per_slice > 0])) == 5
    assert len(np.unique(linked[linked > 0])) == 3 and sorted(classes[1:].tolist()) == [1, 1, 2]
    assert len(np.unique(linked[0:3, 4:8, 4:8])) == 1
    for i in range(4):  # more strokes of class 1, so that the draw can hold some back
        labels[2, 12 + 4 * i : 14 + 4 * i, 26:30] = 1
    cut = {True: 0, False: 0}
    for seed in range(20):
        for link in (True, False):
            part = split_strokes(labels, 0.3, seed=seed, link_slices=link).val[0:3, 4:8, 4:8] > 0
            cut[link] += int(part.any() and not part.all())
    assert cut[True] == 0 and cut[False] > 0  # slice by slice, the draw does cut it
