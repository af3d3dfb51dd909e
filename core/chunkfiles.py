"""Regions of a local zarr array read straight from its chunk files.

zarr-python reads through an asyncio event loop on another thread and decodes in a thread pool:
a 1024x1024 uint8 block of sixteen 256x256 zstd chunks took 9-14 ms of CPU, of which opening,
reading and decoding the sixteen files is 3.5 ms. An agent reads its next block while the current
one computes, so on a node with a spare core that time is free; on a node where every core runs an
agent (the 2-core benchmark at N = 2) it is taken from the model. This reader does only the file
work, for the layouts it fully understands: a local array, not sharded, C order, no filters, raw
bytes (little-endian or single-byte) with at most one of zstd, gzip or blosc. Anything else, and
any index but plain slices, goes to zarr as before.

Its first read of each array is also done through zarr and compared; a difference (a layout this
code misreads) turns it off for that array, with a warning, so it can cost time but never bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_V3_COMPRESSORS = {"zstd", "gzip", "blosc"}


def chunk_reader(vol: Any) -> Any:
    """``vol`` wrapped in a ``ChunkFileReader`` where its layout allows, else ``vol`` itself."""
    decode = _decoder(vol)
    return vol if decode is None else ChunkFileReader(vol, decode)


class ChunkFileReader:
    """``reader[slices]`` reads the region from the chunk files; everything else is the zarr array's."""

    def __init__(self, vol: Any, decode: Callable[[bytes], Any]) -> None:
        from zarr.storage import LocalStore

        assert isinstance(vol.store, LocalStore)
        self.vol = vol
        self.root = Path(vol.store.root) / vol.path if vol.path else Path(vol.store.root)
        self.decode = decode
        self.dtype = np.dtype(vol.dtype)
        self.chunks = tuple(vol.chunks)
        self.shape = tuple(vol.shape)
        self.fill = vol.fill_value if vol.fill_value is not None else 0
        self.checked = False
        self.enabled = True

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
        spans = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, self.chunks)]
        for coords in product(*spans):
            src, dst = [], []
            for (lo, hi), c, i in zip(bounds, self.chunks, coords):
                a, b = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - lo, b - lo))
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


def _decoder(vol: Any) -> Callable[[bytes], Any] | None:
    """How to turn a chunk file of ``vol`` into its bytes, or None where this module does not read it."""
    try:
        import numcodecs
        from zarr.storage import LocalStore

        if not isinstance(vol.store, LocalStore) or np.dtype(vol.dtype).kind not in "biuf":
            return None
        meta = vol.metadata
        if meta.zarr_format == 2:
            if meta.filters or meta.order != "C" or getattr(meta.dtype, "endianness", "little") not in ("little", None):
                return None
            codec = meta.compressor
        else:
            codecs = list(meta.codecs)
            first = codecs[0].to_dict()
            endian = (first.get("configuration") or {}).get("endian", "little")
            if first.get("name") != "bytes" or endian not in ("little", None) or len(codecs) > 2:
                return None
            if len(codecs) == 1:
                codec = None
            else:
                name = codecs[1].to_dict().get("name")
                if name not in _V3_COMPRESSORS:
                    return None
                codec = numcodecs.get_codec({"id": name})
    except Exception:  # a layout or a zarr version this module does not know: zarr reads it
        return None
    if codec is None:
        return bytes
    return codec.decode
