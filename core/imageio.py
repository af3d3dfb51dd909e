"""Read and write images: TIFF, zarr, OME-Zarr, NumPy (.npy, .npz). Arrays keep their dtype."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from dlorch.core.errors import BadInput, one_line
from dlorch.core.store import image_suffix

READ_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".zarr", ".ome.zarr", ".npy", ".npz")
WRITE_FORMATS = {".tif": "tif", ".tiff": "tif", ".ome.tif": "tif", ".zarr": "zarr", ".ome.zarr": "zarr", ".npy": "npy"}


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
            return _numbers(_load_numpy(path), path)
        if suf == ".npz":
            with _load_numpy(path) as z:
                name = _pick(list(z.files), key, role, path)
                return _numbers(_load_numpy(f"{path}:{name}", lambda: z[name]), f"{path}:{name}")
        if suf in (".zarr", ".ome.zarr"):
            from dlorch.core import omezarr

            if key is None and omezarr.is_ome_zarr(str(path)):  # the full-resolution level
                return _numbers(omezarr.read_level(str(path)), path)
            return np.asarray(open_zarr_array(path, key, role))
    except BadInput:
        raise
    except Exception as e:  # a corrupt file: say which, not where in the reader it broke
        raise BadInput(f"cannot read {role} {path}: {type(e).__name__}: {one_line(e)}") from None
    raise BadInput(f"unsupported {role} format {suf!r} for {path}; use one of {', '.join(READ_SUFFIXES)}")


def _load_numpy(path: Path | str, load=None):
    """``np.load`` without pickles; a file that would need them is named as not an array of numbers.

    numpy's own message suggests ``allow_pickle=True``: loading a pickle runs code from the file,
    a fix no user should be told to apply.
    """
    try:
        return load() if load else np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" not in str(e):
            raise
        raise BadInput(_NOT_NUMBERS.format(path=path)) from None


_NOT_NUMBERS = "{path} is not a NumPy array file of numbers (dlorch never loads pickled objects); save it with np.save"


def _numbers(array: np.ndarray, name) -> np.ndarray:
    """The array, if it holds numbers (bool, integers, floats); strings or records are refused here."""
    if array.dtype.kind not in "biuf":
        raise BadInput(f"{name} holds {array.dtype} values, not numbers; save an array of numbers with np.save")
    return array


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
        raise BadInput(f"output {path} must end in .tif, .zarr, .ome.zarr or .npy")
    return WRITE_FORMATS[suf]


def check_output_path(path: str | Path, inputs: Iterable[str | Path] = (), fmt: str | None = None) -> None:
    """Raise ``BadInput`` unless an output can be written at ``path`` without destroying anything.

    Refused: an output that is one of ``inputs``; a parent path that is a file, or a directory
    where a file cannot be created (tried; missing directories are created by the writer); an
    existing directory for a .tif/.npy; an existing path for a .zarr that is not a zarr array
    (only a previous output, which is an array, may be replaced). A URL (``s3://...``) is
    checked by ``dlorch.core.volumes.check_output_volume``.

    Args:
        path: the output path (or URL) the user gave.
        inputs: the job's input paths or URLs (``file.npz:NAME`` allowed); the output must be none of them.
        fmt: tif, zarr or npy; by default from the suffix of ``path``.
    """
    from dlorch.core.volumes import check_output_volume, same_location

    for inp in inputs:
        if same_location(str(path), str(split_key(str(inp))[0]) if "://" not in str(inp) else str(inp)):
            raise BadInput(f"the output {path} is the input; choose another path")
    if "://" in str(path):
        check_output_volume(str(path))
        return
    path = Path(path)
    fmt = fmt or output_format(path)
    target = path.resolve()
    parent = target.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)  # missing ones are created
    if existing is not None and not existing.is_dir():
        raise BadInput(f"cannot write {path}: {existing} is a file, not a directory; choose another path")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {path}: no permission to write in {existing}; choose another path")
    if existing is not None:
        _probe_write(path, existing)
    if not parent.is_dir():
        return
    if not (path.exists() or path.is_symlink()):
        return
    if fmt == "zarr":
        check_output_volume(str(path))  # only a zarr array, a previous output, may be replaced
    elif path.is_dir():
        raise BadInput(f"output {path} is a directory; give a file name ending in {path.suffix or '.' + fmt}")


def _probe_write(path: Path, directory: Path) -> None:
    """Create and remove an empty file in ``directory``: ``os.access`` answers yes to root everywhere,
    also where the write then fails (an NFS export that squashes root, a read-only or pseudo
    filesystem such as /proc), and a job would otherwise train for minutes before its output fails."""
    probe = directory / f".dlorch-probe-{uuid.uuid4().hex}"
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise BadInput(f"cannot write {path}: creating a file in {directory} failed ({e.strerror}); "
                       "choose another path") from None
    probe.unlink(missing_ok=True)


def write_image(array: np.ndarray, path: Path, fmt: str | None = None, grid=None, labels: bool | None = None) -> Path:
    """Write an array as TIFF (ImageJ-readable), zarr, OME-Zarr or .npy, atomically (temp name, then rename).

    Only what ``check_output_path`` allows is replaced: an existing file, or a zarr array (a
    previous output) for a .zarr; anything else raises ``BadInput`` and is left as it is.

    Args:
        array: (Z,)Y,X.
        path: a name ending in ``.ome.zarr`` writes an OME-Zarr pyramid (``dlorch.core.omezarr``).
        fmt: tif, zarr or npy; by default from the suffix.
        grid: axes and voxel size (``omezarr.Grid``) for TIFF (ImageJ spacing and resolution) and
            OME-Zarr; pixels if None.
        labels: a label map (OME-Zarr levels by nearest neighbour); by default for uint8 and bool arrays.
    """
    path = Path(path)
    fmt = fmt or output_format(path)
    if fmt not in ("tif", "npy", "zarr"):
        raise BadInput(f"unknown output format {fmt!r}; use tif, zarr or npy")
    check_output_path(path, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if fmt == "tif":
            import tifffile

            imagej = array.dtype in (np.uint8, np.uint16, np.float32) and array.ndim <= 6
            if imagej and array.ndim in (2, 3):
                tifffile.imwrite(tmp, array, imagej=True, **_imagej_scale(array.ndim, grid))
            else:
                tifffile.imwrite(tmp, array, imagej=imagej)
        elif fmt == "npy":
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        elif image_suffix(path) == ".ome.zarr":
            from dlorch.core import omezarr

            is_labels = labels if labels is not None else array.dtype in (np.uint8, np.bool_)
            omezarr.write_array(array, str(tmp), grid, labels=is_labels)
        else:
            import zarr

            chunks = tuple(min(s, c) for s, c in zip(array.shape, (1,) * max(0, array.ndim - 2) + (512, 512)))
            z = zarr.create_array(str(tmp), shape=array.shape, dtype=array.dtype, chunks=chunks)
            z[...] = array
        if path.is_dir():  # a previous zarr output (checked above): os.replace cannot replace a full directory
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


def _imagej_scale(ndim: int, grid) -> dict:
    """tifffile's ImageJ options: axes, and the voxel size (resolution in pixels per unit, Z spacing) if known."""
    meta: dict = {"axes": "ZYX"[-ndim:]}
    if grid is None:
        return {"metadata": meta, "resolution": (1.0, 1.0)}
    unit = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm"}.get(grid.unit or "", grid.unit or "pixel")
    meta["unit"] = unit
    if ndim == 3:
        meta["spacing"] = float(grid.scale[0])
    y, x = grid.scale[-2:]
    return {"metadata": meta, "resolution": (1.0 / float(x), 1.0 / float(y))}


def read_grid(path: str | Path):
    """The axes and voxel size of an OME-Zarr image or an ImageJ TIFF (``omezarr.Grid``), or None if not given."""
    from dlorch.core import omezarr

    suf = image_suffix(Path(str(path)))
    try:
        if suf in (".zarr", ".ome.zarr"):
            return omezarr.read_grid(str(path))
        if suf in (".tif", ".tiff") and Path(path).is_file():
            import tifffile

            with tifffile.TiffFile(path) as tf:
                ij = tf.imagej_metadata or {}
                tags = tf.pages[0].tags
                if not ij or "XResolution" not in tags:
                    return None
                xr, yr = (a / b for a, b in (tags["XResolution"].value, tags["YResolution"].value))
                unit = {"um": "micrometer", "\u00b5m": "micrometer", "nm": "nanometer"}.get(ij.get("unit"))
                ndim = tf.series[0].ndim
                if ndim not in (2, 3):
                    return None
                scale = ((float(ij.get("spacing", 1.0)),) if ndim == 3 else ()) + (1.0 / yr, 1.0 / xr)
                return omezarr.Grid(tuple("zyx"[-ndim:]), scale, unit)
    except Exception:  # a scale is a nicety: an unreadable one is left out, never an error
        return None
    return None
