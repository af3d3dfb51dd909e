"""Read and write images: TIFF, zarr, NumPy (.npy, .npz). Arrays keep their dtype."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from dlorch.core.errors import BadInput
from dlorch.core.store import image_suffix

READ_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".zarr", ".ome.zarr", ".npy", ".npz")
WRITE_FORMATS = {".tif": "tif", ".tiff": "tif", ".ome.tif": "tif", ".zarr": "zarr", ".npy": "npy"}


def split_key(spec: str) -> tuple[Path, str | None]:
    """``file.npz:labels`` → (file.npz, "labels"); a plain path → (path, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".npz") and "/" not in tail and "\\" not in tail:
        return Path(head), tail
    return Path(spec), None


def read_image(path: Path, key: str | None = None, role: str = "image") -> np.ndarray:
    """Read an image as a NumPy array.

    Args:
        path: a TIFF file, a zarr array or group (first array), a ``.npy`` or ``.npz``.
        key: the array to take from an ``.npz`` or zarr group; by default ``role`` if present, or the only one.
        role: ``image`` or ``labels``, used to pick an array from a container.
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{role} file not found: {path}")
    suf = image_suffix(path)
    try:
        if suf in (".tif", ".tiff", ".ome.tif", ".ome.tiff"):
            import tifffile

            return tifffile.imread(path)
        if suf == ".npy":
            return np.load(path, allow_pickle=False)
        if suf == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z[_pick(list(z.files), key, role, path)]
        if suf in (".zarr", ".ome.zarr"):
            return np.asarray(open_zarr_array(path, key, role))
    except BadInput:
        raise
    except Exception as e:  # a corrupt file: say which, not where in the reader it broke
        raise BadInput(f"cannot read {role} {path}: {type(e).__name__}: {e}") from None
    raise BadInput(f"unsupported {role} format {suf!r} for {path}; use one of {', '.join(READ_SUFFIXES)}")


def open_zarr_array(path: Path, key: str | None = None, role: str = "image"):
    """Open a zarr array, or the named (or first) array of a zarr group, without reading it."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node
    names = sorted(name for name, _ in node.arrays())
    return node[_pick(names, key, role, path)]


def _pick(names: list[str], key: str | None, role: str, path: Path) -> str:
    if key is not None:
        if key not in names:
            raise BadInput(f"{path} has no array {key!r}; it has {', '.join(names)}")
        return key
    if role in names:
        return role
    if len(names) == 1:
        return names[0]
    raise BadInput(f"{path} holds several arrays ({', '.join(names)}); name one as {path}:NAME")


def output_format(path: Path) -> str:
    """The writer format (tif, zarr, npy) an output path asks for."""
    suf = image_suffix(path)
    if suf not in WRITE_FORMATS:
        raise BadInput(f"output {path} must end in .tif, .zarr or .npy")
    return WRITE_FORMATS[suf]


def write_image(array: np.ndarray, path: Path, fmt: str | None = None) -> Path:
    """Write an array as TIFF (ImageJ-readable), zarr or .npy, atomically (temp name, then rename)."""
    path = Path(path)
    fmt = fmt or output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if fmt == "tif":
        import tifffile

        imagej = array.dtype in (np.uint8, np.uint16, np.float32) and array.ndim <= 6
        tifffile.imwrite(tmp, array, imagej=imagej, metadata={"axes": "ZYX"[-array.ndim :]} if imagej and array.ndim <= 3 else None)
    elif fmt == "npy":
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    elif fmt == "zarr":
        import zarr

        chunks = tuple(min(s, c) for s, c in zip(array.shape, (1,) * max(0, array.ndim - 2) + (512, 512)))
        z = zarr.create_array(str(tmp), shape=array.shape, dtype=array.dtype, chunks=chunks)
        z[...] = array
    else:
        raise BadInput(f"unknown output format {fmt!r}; use tif, zarr or npy")
    if path.exists() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
