"""Zarr volumes by URL (a local path or ``s3://``), for blockwise reading and writing."""

from __future__ import annotations

import os
from typing import Any

from dlorch.core.errors import BadInput, Unreachable


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for a URL: the S3 endpoint from ``AWS_ENDPOINT_URL[_S3]`` (moto, MinIO, Ceph)."""
    if not url.startswith("s3://"):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def open_volume(url: str, mode: str = "r"):
    """Open a zarr array (or the first array of a group) at ``url``."""
    import zarr

    try:
        node = zarr.open(url if "://" in url else str(url), mode=mode, storage_options=storage_options(url))
    except FileNotFoundError:
        raise BadInput(f"no zarr volume at {url}; check the path or URL") from None
    except Exception as e:
        raise _explain(url, e) from None
    if isinstance(node, zarr.Array):
        return node
    names = sorted(name for name, _ in node.arrays())
    if not names:
        raise BadInput(f"zarr group {url} holds no array")
    return node[names[0]]


def create_volume(url: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                  attributes: dict[str, Any] | None = None):
    """Create (or open, if it already has this layout) the output array at ``url``."""
    import zarr

    try:
        existing = zarr.open_array(url, mode="r", storage_options=storage_options(url))
        if tuple(existing.shape) == tuple(shape) and tuple(existing.chunks) == tuple(chunks) \
                and str(existing.dtype) == dtype:
            return zarr.open_array(url, mode="r+", storage_options=storage_options(url))
    except Exception:
        pass
    try:
        return zarr.create_array(url, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True,
                                 attributes=attributes or {}, storage_options=storage_options(url))
    except Exception as e:
        raise _explain(url, e) from None


def _explain(url: str, e: Exception) -> Exception:
    text = f"{type(e).__name__}: {e}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return BadInput(f"bucket of {url} does not exist; create it or fix the URL")
    if any(w in text for w in ("Could not connect", "ConnectTimeout", "EndpointConnectionError", "Connection refused")):
        return Unreachable(f"cannot reach {url}: {e}; check the endpoint and credentials")
    return BadInput(f"cannot open zarr volume {url}: {text}")
