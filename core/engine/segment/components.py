"""Connected components of painted label strokes, per 2D slice (8-connectivity).

scipy and scikit-image are not dependencies of dlorch, so this is a small run-length
implementation: each row of a mask is cut into runs, runs that touch across neighbouring
rows are joined with a vectorised union-find. Its cost grows with the number of runs,
not pixels, so dense label maps stay cheap too.
"""

from __future__ import annotations

import numpy as np


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True in every row of a 2D mask.

    Returns:
        (row, first column, last column) of each run, ordered by row then column.
    """
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    start_r, start_c = np.nonzero(edges == 1)
    _, stop_c = np.nonzero(edges == -1)
    return start_r, start_c, stop_c - 1


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root index of each of n nodes joined by the edges (a[i], b[i])."""
    parent = np.arange(n)
    if len(a) == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        before = parent.copy()
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        # Pointer jumping until every node points at its root keeps the loop count small.
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        if np.array_equal(parent, before):
            return parent


def label_components_2d(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of a 2D boolean mask.

    Args:
        mask: (Y, X) boolean array.

    Returns:
        (labels, count): int32 array with 0 outside the mask and 1..count inside.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.int32)
    rows, first, last = _row_runs(mask)
    n = len(rows)
    if n == 0:
        return out, 0
    # Key every column position by row so one sorted array serves all rows; the +1 keeps
    # column -1 (a diagonal neighbour) inside the row's key band.
    width = mask.shape[1] + 2
    key_first = rows * width + first + 1
    key_last = rows * width + last + 1
    # A run [f, l] on row r touches a run [f2, l2] on row r+1 when f2 <= l+1 and l2 >= f-1.
    lo = np.searchsorted(key_last, (rows + 1) * width + first, side="left")
    hi = np.searchsorted(key_first, (rows + 1) * width + last + 2, side="right")
    counts = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(n), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    dst = np.repeat(lo, counts) + offsets
    roots = _union_find(n, src, dst)
    _, compact = np.unique(roots, return_inverse=True)
    lengths = last - first + 1
    starts = rows * mask.shape[1] + first
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out.reshape(-1)[np.repeat(starts, lengths) + within] = np.repeat(compact + 1, lengths)
    return out, int(compact.max()) + 1


def label_strokes(labels: np.ndarray, link_slices: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split a (Z, Y, X) class map into strokes: connected components of one class in one slice.

    Args:
        labels: (Z, Y, X) integer map, 0 = unlabelled.
        link_slices: also join components of one class that touch across adjacent slices (the
            same Y, X painted on slice z and z + 1): for a volume seen in 3D, a stroke painted
            through several slices is one stroke, and must not sit on both sides of a split.

    Returns:
        (stroke_ids, stroke_class): int32 map with 0 where unlabelled and 1..S per stroke, and
        an array of length S + 1 giving each stroke's class (index 0 unused).
    """
    stroke_ids = np.zeros(labels.shape, dtype=np.int32)
    classes = [0]
    next_id = 1
    for z in range(labels.shape[0]):
        for c in np.unique(labels[z]):
            if c == 0:
                continue
            comp, count = label_components_2d(labels[z] == c)
            inside = comp > 0
            stroke_ids[z][inside] = comp[inside] + (next_id - 1)
            classes.extend([int(c)] * count)
            next_id += count
    stroke_class = np.asarray(classes, dtype=np.int64)
    if not link_slices or labels.shape[0] < 2:
        return stroke_ids, stroke_class
    touch = (labels[:-1] > 0) & (labels[:-1] == labels[1:])
    pairs = np.unique(np.stack([stroke_ids[:-1][touch], stroke_ids[1:][touch]], axis=1), axis=0)
    parent = np.arange(len(stroke_class))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(parent))])
    kept, new_ids = np.unique(roots, return_inverse=True)  # root 0 (unlabelled) stays 0
    return new_ids[stroke_ids].astype(np.int32), stroke_class[kept]
