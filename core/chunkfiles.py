"""Regions of a local zarr array read from and written to its chunk files directly.

zarr-python reads through an asyncio event loop on another thread and decodes in a thread pool:
a 1024x1024 uint8 block of sixteen 256x256 zstd chunks took 11 ms of CPU, of which opening,
reading and decoding the sixteen files is about 4 ms. An agent reads its next block while the current
one computes, so on a node with a spare core that time is free; on a node where every core runs an
agent (the 2-core benchmark at N = 2) it is taken from the model. This reader does only the file
work, for the layouts it fully understands: a local array, not sharded, C order, no filters, raw
bytes (little-endian or single-byte) with at most one of zstd, gzip or blosc. Anything else, and
any index but plain slices, goes to zarr as before.

Writing a 1024x1024 uint8 block as one zstd chunk took 10.5 ms of CPU through zarr and 3.8 ms as
an encode and a file: a write is on an agent's critical path. Only whole chunks are written here
(an agent's block is a union of output chunks), each to a temporary file renamed into place, so a
reader never sees half a chunk; a chunk that is all fill value is removed instead, as zarr does.
Partial chunks and other layouts go to zarr.

The first read and the first write of each array are also checked against zarr (the region read
through it; the written chunk read back through it); a difference (a layout this code gets wrong)
turns it off for that array, with a warning, so it can cost time but never bytes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_V3_COMPRESSORS = {"zstd", "gzip", "blosc"}


def chunk_files(vol: Any) -> Any:
    """``vol`` wrapped in ``ChunkFiles`` where its layout allows, else ``vol`` itself."""
    codec = _codec(vol)
    return vol if codec is False else ChunkFiles(vol, codec)


class ChunkFiles:
    """``files[slices]`` reads the region from the chunk files and ``files[slices] = values`` writes
    whole chunks to them; everything else is the zarr array's."""

    def __init__(self, vol: Any, codec: Any) -> None:
        from zarr.storage import LocalStore

        assert isinstance(vol.store, LocalStore)
        self.vol = vol
        self.root = Path(vol.store.root) / vol.path if vol.path else Path(vol.store.root)
        self.decode: Callable[[bytes], Any] = codec.decode if codec is not None else bytes
        self.encode: Callable[[np.ndarray], Any] = codec.encode if codec is not None else np.ndarray.tobytes
        self.dtype = np.dtype(vol.dtype)
        self.chunks = tuple(vol.chunks)
        self.shape = tuple(vol.shape)
        self.fill = vol.fill_value if vol.fill_value is not None else 0
        self.checked = False
        self.enabled = True
        self.write_checked = False
        self.writes_enabled = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vol, name)

    def __getitem__(self, index: Any) -> np.ndarray:
        bounds = self._bounds(index) if self.enabled else None
        if bounds is None:
            return np.asarray(self.vol[index])
        out = self._read(bounds)
        if not self.checked:
            expected = np.asarray(self.vol[index])
            self.checked = True
            if not np.array_equal(out, expected, equal_nan=out.dtype.kind == "f"):
                self.enabled = False
                log.warning("reading %s chunk by chunk gave other values than zarr; zarr reads it from now on",
                            self.root)
                return expected
        return out

    def __setitem__(self, index: Any, values: Any) -> None:
        bounds = self._bounds(index) if self.writes_enabled else None
        values = np.asarray(values)
        if bounds is None or values.shape != tuple(hi - lo for lo, hi in bounds) or not self._whole_chunks(bounds):
            self.vol[index] = values
            return
        values = values.astype(self.dtype, copy=False)
        for coords, src, dst in self._pieces(bounds):
            chunk = values[tuple(dst)]
            if chunk.shape != self.chunks:  # an edge chunk: stored whole, the part past the array filled
                full = np.full(self.chunks, self.fill, dtype=self.dtype)
                full[tuple(src)] = chunk
                chunk = full
            self._put(coords, chunk)
            if not self.write_checked:
                self.write_checked = True
                where = tuple(slice(lo + d.start, lo + d.stop) for (lo, _), d in zip(bounds, dst))
                try:
                    back = np.asarray(self.vol[where])
                except Exception:  # zarr cannot even decode it
                    back = None
                if back is None or not np.array_equal(back, values[tuple(dst)], equal_nan=self.dtype.kind == "f"):
                    self.writes_enabled = False
                    log.warning("writing %s chunk by chunk gave other values through zarr; zarr writes it from now on",
                                self.root)
                    self.vol[index] = values
                    return

    def _put(self, coords: tuple[int, ...], chunk: np.ndarray) -> None:
        path = self.root / self.vol.metadata.encode_chunk_key(coords)
        if np.all(chunk == self.fill) if not _is_nan(self.fill) else np.isnan(chunk).all():
            path.unlink(missing_ok=True)  # zarr stores no chunk that holds only the fill value
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(self.encode(np.ascontiguousarray(chunk)))
        os.replace(tmp, path)  # whole or not at all; the same block written twice gives the same file

    def _whole_chunks(self, bounds: list[tuple[int, int]]) -> bool:
        """Whether the region covers whole chunks (up to the array's end)."""
        return all(lo % c == 0 and (hi % c == 0 or hi == n) for (lo, hi), c, n in zip(bounds, self.chunks, self.shape))

    def _bounds(self, index: Any) -> list[tuple[int, int]] | None:
        parts = index if isinstance(index, tuple) else (index,)
        if len(parts) > len(self.shape) or not all(isinstance(p, slice) for p in parts):
            return None
        parts = parts + (slice(None),) * (len(self.shape) - len(parts))
        bounds = []
        for p, n in zip(parts, self.shape):
            start, stop, step = p.indices(n)
            if step != 1:
                return None
            bounds.append((start, max(start, stop)))
        return bounds

    def _read(self, bounds: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty([hi - lo for lo, hi in bounds], dtype=self.dtype)
        if out.size == 0:
            return out
        for coords, src, dst in self._pieces(bounds):
            path = self.root / self.vol.metadata.encode_chunk_key(coords)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:  # never written: the fill value, as zarr gives it
                out[tuple(dst)] = self.fill
                continue
            data = np.frombuffer(self.decode(raw), dtype=self.dtype)
            if data.size != math.prod(self.chunks):
                raise ValueError(f"chunk {path} holds {data.size} values, not {math.prod(self.chunks)}")
            out[tuple(dst)] = data.reshape(self.chunks)[tuple(src)]
        return out

    def _pieces(self, bounds: list[tuple[int, int]]):
        """(chunk coordinates, slices into the chunk, slices into the region) of every chunk the region meets."""
        spans = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, self.chunks)]
        for coords in product(*spans):
            src, dst = [], []
            for (lo, hi), c, i in zip(bounds, self.chunks, coords):
                a, b = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - lo, b - lo))
            yield coords, src, dst


def _is_nan(value: Any) -> bool:
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False


def _codec(vol: Any) -> Any:
    """The numcodecs codec of ``vol``'s chunk files, None for raw bytes, or False where this module
    does not handle its layout."""
    try:
        import numcodecs
        from zarr.storage import LocalStore

        if not isinstance(vol.store, LocalStore) or np.dtype(vol.dtype).kind not in "biuf":
            return False
        meta = vol.metadata
        if meta.zarr_format == 2:
            if meta.filters or meta.order != "C" or getattr(meta.dtype, "endianness", "little") not in ("little", None):
                return False
            return meta.compressor
        else:
            codecs = list(meta.codecs)
            first = codecs[0].to_dict()
            endian = (first.get("configuration") or {}).get("endian", "little")
            if first.get("name") != "bytes" or endian not in ("little", None) or len(codecs) > 2:
                return False
            if len(codecs) == 1:
                return None
            config = codecs[1].to_dict()
            if config.get("name") not in _V3_COMPRESSORS:
                return False
            return numcodecs.get_codec({"id": config["name"], **_numcodecs_config(config)})
    except Exception:  # a layout or a zarr version this module does not know: zarr handles it
        return False


def _numcodecs_config(config: dict) -> dict:
    """numcodecs arguments for a zarr v3 compressor's configuration (the encoding settings)."""
    c = dict(config.get("configuration") or {})
    if config["name"] == "blosc":  # zarr v3 names the shuffle; numcodecs numbers it
        c["shuffle"] = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(c.get("shuffle"), 1)
        c.pop("typesize", None)
    return c
