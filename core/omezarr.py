"""OME-Zarr (NGFF) images: read the full-resolution level and its physical scale; write results as pyramids.

A result is written as an NGFF multiscale image (local path or ``s3://``): level 0 at full
resolution, each further level downsampled from the one before by 2 in-plane (and along Z where
the voxels are about cubic). Labels are downsampled by nearest neighbour, images by the mean. A
segmentation of an OME-Zarr image is written as a ``labels/`` group of a copy of that image, so
napari and other NGFF viewers show it as a labels layer over the image.

A pyramid is written block by block: a block (whole level-0 chunks, aligned to the chunk grid)
downsamples its own core level after level and writes whole chunks of every level, since a level's
chunks are the level-0 chunks shrunk by the same factors. No level ever needs the whole volume in
memory, blocks never share a chunk, and a block re-run writes the same bytes.

The group carries the ``dlorch`` stamp of blockwise outputs (``core/volumes.py``) and a marker
(``OUTPUT``) that tells a previous dlorch output, which may be replaced, from anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlorch.core.errors import BadInput

OUTPUT = "dlorch_output"  # group attribute: this OME-Zarr was written by dlorch (a previous output)
LAYOUT = "dlorch_pyramid"  # group attribute: the pyramid's layout, which every block writer reads back
LABELS_NAME = "segmentation"  # the labels image under ``labels/`` of an image copy
MIN_LEVEL_SIDE = 32  # no level smaller than this along a downsampled axis
MAX_LEVELS = 6
_SPATIAL = ("z", "y", "x")


@dataclass(frozen=True)
class Grid:
    """The spatial axes of an image and its physical voxel size (level 0)."""

    axes: tuple[str, ...]  # "zyx" or "yx"
    scale: tuple[float, ...]  # voxel size per axis
    unit: str | None = None  # e.g. "micrometer"; None: pixels

    @classmethod
    def pixels(cls, ndim: int) -> "Grid":
        return cls(tuple(_SPATIAL[-ndim:]), (1.0,) * ndim)


def _options(url: str):
    from dlorch.core.volumes import storage_options

    return storage_options(url)


def _open_group(url: str, mode: str = "r"):
    import zarr

    return zarr.open_group(url if "://" in url else str(url), mode=mode, storage_options=_options(str(url)))


def multiscales(url: str) -> dict[str, Any] | None:
    """The first ``multiscales`` entry of the group at ``url`` (NGFF 0.4 or 0.5), or None if it is not OME-Zarr."""
    try:
        attrs = dict(_open_group(str(url)).attrs)
    except Exception:
        return None
    ms = (attrs.get("ome") or {}).get("multiscales") if isinstance(attrs.get("ome"), dict) else None
    ms = ms or attrs.get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


def is_ome_zarr(url: str) -> bool:
    """Whether ``url`` holds an OME-Zarr multiscale image."""
    return multiscales(str(url)) is not None


def _spatial(ms: dict[str, Any], url: str) -> tuple[list[int], Grid]:
    """Indices of the spatial axes of a multiscale image, and its grid at level 0."""
    axes = ms.get("axes") or [{"name": n} for n in "tczyx"[-len(_first_scale(ms) or [0] * 5):]]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    keep = [i for i, n in enumerate(names) if n in _SPATIAL]
    if len(keep) not in (2, 3):
        raise BadInput(f"OME-Zarr {url} has axes {''.join(names)}; dlorch reads 2D (yx) or 3D (zyx) images")
    scale = _first_scale(ms) or [1.0] * len(names)
    units = {axes[i].get("unit") for i in keep if isinstance(axes[i], dict)}
    unit = units.pop() if len(units) == 1 else None
    return keep, Grid(tuple(names[i] for i in keep), tuple(float(scale[i]) for i in keep), unit)


def _first_scale(ms: dict[str, Any]) -> list[float] | None:
    for t in (ms.get("datasets") or [{}])[0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return list(t["scale"])
    return None


def read_grid(url: str) -> Grid | None:
    """The spatial axes and voxel size of an OME-Zarr image, or None if ``url`` is not one."""
    ms = multiscales(str(url))
    return _spatial(ms, str(url))[1] if ms else None


def open_level(url: str, level: int = 0):
    """The zarr array of pyramid ``level`` (0: full resolution) of an OME-Zarr image, not read."""
    ms = multiscales(str(url))
    if ms is None:
        raise BadInput(f"{url} is not an OME-Zarr image (no multiscales metadata)")
    datasets = ms.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise BadInput(f"OME-Zarr {url} has {len(datasets)} levels; level {level} does not exist")
    return _open_group(str(url))[datasets[level]["path"]]


def read_level(url: str, level: int = 0) -> np.ndarray:
    """A pyramid level of an OME-Zarr image as (Z,)Y,X: non-spatial axes of length 1 dropped."""
    ms = multiscales(str(url))
    keep, _ = _spatial(ms, str(url)) if ms else ([], None)
    array = np.asarray(open_level(url, level)[...])
    drop = [i for i in range(array.ndim) if i not in keep]
    if any(array.shape[i] != 1 for i in drop):
        raise BadInput(f"OME-Zarr {url} has channels or time points ({array.shape}); dlorch reads one channel")
    return array.reshape([array.shape[i] for i in keep])


# -- writing -------------------------------------------------------------------------------------------

@dataclass
class Pyramid:
    """Where a result goes in an OME-Zarr group and how its levels shrink."""

    url: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # level 0
    factors: tuple[int, ...]  # per axis, between consecutive levels
    levels: int
    grid: Grid
    labels: bool  # the result is a label map (nearest-neighbour levels)
    with_image: bool  # the input image is copied as the root image, the result under labels/
    arrays: dict[str, list[Any]] = field(default_factory=dict, repr=False)  # opened level arrays, by role

    def level_shape(self, n: int) -> tuple[int, ...]:
        return tuple(math.ceil(s / f**n) for s, f in zip(self.shape, self.factors))

    def level_chunks(self, n: int) -> tuple[int, ...]:
        return tuple(max(1, math.ceil(c / f**n)) for c, f in zip(self.chunks, self.factors))

    def prefix(self, role: str) -> str:
        """The group path of ``role`` ("result" or "image") inside the OME-Zarr."""
        if role == "image" or not self.with_image:
            return ""
        return f"labels/{LABELS_NAME}/"

    def fenced(self) -> str:
        """The URL whose ``dlorch`` stamp the blockwise output fencing checks: the group itself."""
        return self.url


def plan_pyramid(url: str, shape: tuple[int, ...], chunks: tuple[int, ...], grid: Grid | None, labels: bool,
                 with_image: bool = False) -> Pyramid:
    """The pyramid of a result of ``shape`` written in level-0 ``chunks``.

    In-plane axes halve at every level; Z too where a Z step is at most 1.5 in-plane steps. Levels
    go on while every downsampled axis stays at least ``MIN_LEVEL_SIDE`` long and its chunk side
    stays divisible (so blocks, made of whole chunks, still own whole chunks of every level).
    """
    grid = grid or Grid.pixels(len(shape))
    if len(grid.axes) != len(shape):
        grid = Grid.pixels(len(shape))
    factors = [2] * len(shape)
    if len(shape) == 3 and grid.scale[0] > 1.5 * min(grid.scale[1:]):
        factors[0] = 1
    levels = 1
    while levels < MAX_LEVELS:
        f = 2**levels
        ok = all(fa == 1 or (s // f >= MIN_LEVEL_SIDE and (c % f == 0 or c >= s))
                 for s, c, fa in zip(shape, chunks, factors))
        if not ok:
            break
        levels += 1
    return Pyramid(str(url), tuple(shape), tuple(chunks), tuple(factors), levels, grid, labels, with_image)


def _axes(grid: Grid) -> list[dict[str, str]]:
    return [{"name": a, "type": "space", **({"unit": grid.unit} if grid.unit else {})} for a in grid.axes]


def _datasets(p: Pyramid) -> list[dict[str, Any]]:
    return [{"path": str(n), "coordinateTransformations": [
        {"type": "scale", "scale": [s * f**n for s, f in zip(p.grid.scale, p.factors)]}]} for n in range(p.levels)]


def create_pyramid(p: Pyramid, dtype: str, image_dtype: str | None = None,
                   attributes: dict[str, Any] | None = None) -> None:
    """Create the OME-Zarr group, its metadata and empty level arrays (anything at ``p.url`` is replaced).

    ``attributes`` (the blockwise stamp, the model) go on the group, after the NGFF metadata.
    """
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    root = zarr.open_group(p.url if "://" in p.url else str(p.url), mode="w", storage_options=_options(p.url),
                           zarr_format=3)
    roles = [("image", image_dtype), ("result", dtype)] if p.with_image else [("result", dtype)]
    for role, dt in roles:
        group = root if not p.prefix(role) else root.require_group(p.prefix(role).rstrip("/"))
        for n in range(p.levels):
            group.create_array(str(n), shape=p.level_shape(n), chunks=p.level_chunks(n), dtype=dt, fill_value=0,
                               dimension_names=list(p.grid.axes))
        write_multiscales_metadata(group, _datasets(p), fmt=FormatV05(), axes=_axes(p.grid),
                                   name=LABELS_NAME if group is not root else "image")
        if group is not root:
            write_label_metadata(root["labels"], LABELS_NAME, fmt=FormatV05(), source={"image": "../../"})
            root["labels"].attrs.update({"ome": {"version": "0.5", "labels": [LABELS_NAME]}})
    layout = {"shape": list(p.shape), "chunks": list(p.chunks), "factors": list(p.factors), "levels": p.levels,
              "labels": p.labels, "with_image": p.with_image}
    root.attrs.update({OUTPUT: True, LAYOUT: layout, **(attributes or {})})


def load_pyramid(url: str) -> Pyramid | None:
    """The pyramid of the dlorch OME-Zarr output at ``url`` as ``create_pyramid`` laid it out; None if it is none."""
    import zarr

    try:
        node = zarr.open(url if "://" in str(url) else str(url), mode="r", storage_options=_options(str(url)))
    except Exception:  # not there
        return None
    layout = dict(node.attrs).get(LAYOUT) if isinstance(node, zarr.Group) else None
    if not isinstance(layout, dict):  # a plain zarr array output
        return None
    try:
        ms = multiscales(str(url))
        grid = _spatial(ms, str(url))[1] if ms else Grid.pixels(len(layout["shape"]))
        return Pyramid(str(url), tuple(map(int, layout["shape"])), tuple(map(int, layout["chunks"])),
                       tuple(map(int, layout["factors"])), int(layout["levels"]), grid, bool(layout["labels"]),
                       bool(layout["with_image"]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise BadInput(f"OME-Zarr output {url} has a damaged dlorch layout; delete it and submit again") from None


def same_layout(a: Pyramid | None, b: Pyramid) -> bool:
    """Whether an existing output's pyramid ``a`` is laid out as ``b`` (its blocks may be kept)."""
    return a is not None and (a.shape, a.chunks, a.factors, a.levels, a.labels, a.with_image) == \
        (b.shape, b.chunks, b.factors, b.levels, b.labels, b.with_image)


def restamp(url: str, attributes: dict[str, Any]) -> None:
    """Update the group attributes (the stamp) of an existing output, keeping its arrays."""
    _open_group(str(url), mode="r+").attrs.update(attributes)


def open_pyramid(p: Pyramid) -> Pyramid:
    """``p`` with its level arrays opened for writing (once per node and job)."""
    root = _open_group(p.url, mode="r+")
    roles = ["image", "result"] if p.with_image else ["result"]
    p.arrays = {r: [root[f"{p.prefix(r)}{n}"] for n in range(p.levels)] for r in roles}
    return p


def downsample(a: np.ndarray, factors: tuple[int, ...], labels: bool) -> np.ndarray:
    """``a`` shrunk by ``factors``: every factor-th voxel for labels, the mean of each window for images.

    A window cut by the array's far edge averages the voxels it has (the edge voxels repeated).
    """
    if labels:
        return a[tuple(slice(None, None, f) for f in factors)]
    pad = [(0, (-s) % f) for s, f in zip(a.shape, factors)]
    b = np.pad(a.astype(np.float32), pad, mode="edge") if any(p for _, p in pad) else a.astype(np.float32)
    shape = [v for s, f in zip(b.shape, factors) for v in (s // f, f)]
    mean = b.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)))
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(a.dtype)
    return mean.astype(a.dtype)


def write_block(p: Pyramid, core: tuple[tuple[int, int], ...], values: np.ndarray,
                image: np.ndarray | None = None) -> None:
    """Write a block's core (level-0 ``core`` bounds, aligned to the chunk grid) into every level.

    Args:
        p: an opened pyramid (``open_pyramid``).
        core: (start, stop) per axis at level 0.
        values: the result over ``core``.
        image: the input image over ``core``, where the pyramid holds a copy of it.
    """
    for role, data in (("result", values), ("image", image)):
        if role not in p.arrays or data is None:
            continue
        labels = p.labels and role == "result"
        for n, array in enumerate(p.arrays[role]):
            if n:
                data = downsample(data, p.factors, labels)
            f = [fa**n for fa in p.factors]
            index = tuple(slice(a // fa, a // fa + d) for (a, _), fa, d in zip(core, f, data.shape))
            array[index] = data


def write_array(array, url: str, grid: Grid | None = None, labels: bool = False, image=None) -> None:
    """Write a whole result as an OME-Zarr pyramid at ``url`` (replaced if present), block by block.

    ``array`` may be a NumPy array or any array read by slicing (a zarr array: a result fetched from
    the store); only one block of it (``WRITE_BLOCK_VOXELS`` at most, whole chunks) is read and
    downsampled at a time, so a 3D volume never needs its pyramid, or itself, whole in memory.

    Args:
        array: (Z,)Y,X.
        grid: axes and voxel size; pixels if None.
        labels: a label map (nearest-neighbour levels).
        image: the image ``array`` labels, stored as the root image with ``array`` under ``labels/``.
    """
    shape = tuple(int(n) for n in array.shape)
    chunks = tuple(min(s, c) for s, c in zip(shape, (1,) * max(0, len(shape) - 2) + (256, 256)))
    if len(shape) == 3 and grid is not None and grid.scale[0] <= 1.5 * min(grid.scale[1:]):
        chunks = tuple(min(s, 64) for s in shape)  # Z is downsampled too: chunks of several slices
    p = plan_pyramid(url, shape, chunks, grid, labels, with_image=image is not None)
    create_pyramid(p, str(np.dtype(array.dtype)), str(np.dtype(image.dtype)) if image is not None else None)
    open_pyramid(p)
    for core in write_blocks(shape, chunks):
        index = tuple(slice(a, b) for a, b in core)
        write_block(p, core, np.asarray(array[index]), np.asarray(image[index]) if image is not None else None)


WRITE_BLOCK_VOXELS = 2**24  # one block of a whole-result write: 64 MB of float32


def write_blocks(shape: tuple[int, ...], chunks: tuple[int, ...],
                 max_voxels: int | None = None) -> list[tuple[tuple[int, int], ...]]:
    """The blocks of whole chunks that tile ``shape``: a chunk, doubled along X, Y, then Z while it stays
    under ``max_voxels`` (``WRITE_BLOCK_VOXELS``) and inside the shape. The last block along an axis may be
    cut by its end."""
    max_voxels = max_voxels or WRITE_BLOCK_VOXELS
    block = list(chunks)
    grown = True
    while grown:
        grown = False
        for axis in reversed(range(len(shape))):
            if block[axis] < shape[axis] and math.prod(block) * 2 <= max_voxels:
                block[axis] *= 2
                grown = True
    starts = [range(0, s, b) for s, b in zip(shape, block)]
    grid = np.stack(np.meshgrid(*[np.asarray(r) for r in starts], indexing="ij"), -1).reshape(-1, len(shape))
    return [tuple((int(a), min(int(a) + b, s)) for a, b, s in zip(start, block, shape)) for start in grid]
