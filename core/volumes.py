"""Zarr volumes by URL (a local path or ``s3://``), for blockwise reading and writing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dlorch.core.errors import BadInput, StaleWrite, Unreachable, one_line

# The attribute of a blockwise output that names who writes it: {"job": id, "split": the planner attempt's token}.
# A planner writes it when it creates the array; every block write and every later planner checks it first.
STAMP = "dlorch"

Owner = tuple[str, int]  # (job id, split): the job and the planner attempt whose blocks write an output


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
    from dlorch.core import omezarr

    if omezarr.is_ome_zarr(url):  # an OME-Zarr image: its full-resolution level
        return omezarr.open_level(url, 0)
    names = sorted(name for name, _ in node.arrays())
    if not names:
        raise BadInput(f"zarr group {url} holds no array")
    return node[names[0]]


def check_url(url: str, role: str = "input") -> None:
    """Raise ``BadInput`` unless the input at ``url`` can be reached from here: a zarr volume opens,
    any other object exists. A wrong URL, a missing bucket, no credentials or an unreachable endpoint
    fail at submission, in one line, rather than on a node after its retries."""
    if url.rstrip("/").endswith(".zarr"):
        open_volume(url)
        return
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url, **(storage_options(url) or {}))
        found = fs.exists(path) and not fs.isdir(path)
    except Exception as e:
        raise _explain(url, e) from None
    if not found:
        raise BadInput(f"{role} {url} does not exist; check the URL")


def same_location(a: str, b: str) -> bool:
    """Whether two paths or URLs name the same place (``file://`` and relative paths resolved)."""
    return _location(a) == _location(b)


def _location(url: str) -> str:
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        return url.rstrip("/")
    return str(Path(url).expanduser().resolve())


def check_output_volume(url: str, input_url: str | None = None, owner: Owner | None = None) -> None:
    """Raise ``BadInput`` unless a zarr output may be written at ``url`` (a path or URL).

    The output must not be the input, and an existing ``url`` must be a zarr array: a previous
    output, which is replaced. Anything else there (files, a directory of other things, a zarr
    group that may hold other arrays) is refused and left as it is. So is a blockwise output of
    another job (see ``check_owner``); with no ``owner`` (a new submission), of any job.
    """
    if input_url is not None and same_location(url, input_url):
        raise BadInput(f"the output {url} is the input; choose another path")
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **(storage_options(url) or {}))
        root = root.rstrip("/")
        if not fs.exists(root):
            return
        array = fs.isdir(root) and (fs.exists(f"{root}/.zarray") or _is_v3_array(fs, f"{root}/zarr.json")
                                    or _is_ome_output(fs, f"{root}/zarr.json"))  # a dlorch OME-Zarr output
        stamp = _read_stamp(fs, root) if array else None
    except Exception as e:
        raise _explain(url, e) from None
    if not array:
        raise BadInput(f"output {url} exists and is not a zarr array; remove it or choose another path")
    check_owner(url, stamp, owner)


def check_owner(url: str, stamp: dict[str, Any] | None, owner: Owner | None) -> None:
    """Raise unless ``owner`` may (re)create the output at ``url``, whose array carries ``stamp``.

    An unstamped array (no job's, or one written before outputs were stamped) may be replaced. Another
    job's output is refused (``BadInput``); so is a newer split of the same job (``StaleWrite``): its
    planner had the lease after this one, its blocks may be done, and this planner is stale.
    """
    if stamp is None:
        return
    if owner is None or stamp.get("job") != owner[0]:
        raise BadInput(f"output {url} holds the output of job {_job_of(stamp)}; choose another -o or delete it")
    if _split_of(stamp) > owner[1]:
        raise StaleWrite(f"output {url} belongs to split {_split_of(stamp)} of job {owner[0]}, newer than "
                         f"this planner's ({owner[1]}); left as it is")


def check_block_output(url: str, owner: tuple[str, int | None]) -> None:
    """Raise ``BadInput`` unless the array at ``url`` is still the one the split ``owner`` created.

    Called before every block write: an output that another job, or another planner of this job,
    has recreated since the split must not be written into (its blocks done so far are gone or
    are another's). A split recorded before outputs were stamped (``owner[1]`` None) checks the job only.
    """
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **(storage_options(url) or {}))
        stamp = _read_stamp(fs, root.rstrip("/"))
    except Exception as e:
        raise _explain(url, e) from None
    job, split = owner
    if stamp is None and split is None:
        return
    if stamp is None or stamp.get("job") != job:
        whose = f"holds the output of job {_job_of(stamp)}" if stamp else "is no longer this job's output"
        raise BadInput(f"output {url} {whose}; choose another -o or delete it, and submit again")
    if split is not None and _split_of(stamp) != split:
        raise BadInput(f"output {url} was recreated by attempt {_split_of(stamp)} of job {job} after its split "
                       f"by attempt {split}; submit the job again")


def _job_of(stamp: dict[str, Any]) -> str:
    """The stamp's job, as one short line: whoever can write the store can write any stamp."""
    return " ".join(str(stamp.get("job")).split())[:100]


def _split_of(stamp: dict[str, Any]) -> int:
    try:
        return int(stamp.get("split", -1))
    except (TypeError, ValueError):
        return -1


def _read_stamp(fs, root: str) -> dict[str, Any] | None:
    """The ``STAMP`` attribute of the zarr array at ``root`` (v3 or v2 metadata), read fresh; None if absent."""
    for meta, key in ((f"{root}/zarr.json", "attributes"), (f"{root}/.zattrs", None)):
        try:
            doc = json.loads(fs.cat_file(meta))
        except FileNotFoundError:
            continue
        attrs = doc.get(key) if key else doc
        stamp = attrs.get(STAMP) if isinstance(attrs, dict) else None
        return stamp if isinstance(stamp, dict) else None
    return None


def _is_ome_output(fs, meta: str) -> bool:
    """Whether ``meta`` is the group metadata of an OME-Zarr that dlorch wrote (a previous output, replaceable)."""
    from dlorch.core.omezarr import OUTPUT

    try:
        doc = json.loads(fs.cat_file(meta))
        return doc.get("node_type") == "group" and doc.get("attributes", {}).get(OUTPUT) is True
    except (FileNotFoundError, ValueError, AttributeError):
        return False


def _is_v3_array(fs, meta: str) -> bool:
    try:
        return json.loads(fs.cat_file(meta)).get("node_type") == "array"
    except (FileNotFoundError, ValueError, AttributeError):
        return False


def read_region(vol, url: str, index: Any):
    """``vol[index]`` as an array; a failed read names the volume and the region, in one line."""
    import numpy as np

    try:
        return np.asarray(vol[index])
    except Exception as e:  # a corrupt chunk, a lost object: say where, not where in zarr it broke
        err = _explain(url, e)
        if not isinstance(err, BadInput):
            raise err from None
        raise BadInput(f"cannot read {url} ({describe_region(index, vol.shape)}): {one_line(e)}; "
                       f"check the volume, or rewrite the damaged chunk") from None


def describe_region(index: Any, shape: tuple[int, ...]) -> str:
    """``region z 3:4, y 0:64`` for an index into an array of ``shape`` (``whole volume`` for ``...``)."""
    parts = index if isinstance(index, tuple) else (index,)
    if parts in ((Ellipsis,), ()):
        return "whole volume"
    axes = "zyx"[-len(shape):] if len(shape) <= 3 else [f"axis {i}" for i in range(len(shape))]
    named = []
    for axis, n, part in zip(axes, shape, parts):
        if isinstance(part, slice):
            start, stop, _ = part.indices(n)
            named.append(f"{axis} {start}:{stop}")
        elif isinstance(part, (int,)) or hasattr(part, "__index__"):
            named.append(f"{axis} {int(part)}:{int(part) + 1}")
    return "region " + ", ".join(named)


def create_volume(url: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                  attributes: dict[str, Any] | None = None, input_url: str | None = None,
                  owner: Owner | None = None):
    """Create (or open, if it already has this layout) the output array at ``url``, stamped with ``owner``.

    ``check_output_volume`` runs first, just before anything is written: a path that is the input,
    or holds anything but a zarr array, raises ``BadInput``, and so does another job's output; a
    newer split's raises ``StaleWrite``. Each is left untouched.
    """
    import zarr

    check_output_volume(url, input_url, owner)
    attributes = dict(attributes or {})
    if owner is not None:
        attributes[STAMP] = {"job": owner[0], "split": owner[1]}
    existing = None
    try:
        existing = zarr.open_array(url, mode="r", storage_options=storage_options(url))
    except Exception:
        pass
    if existing is not None and tuple(existing.shape) == tuple(shape) and tuple(existing.chunks) == tuple(chunks) \
            and str(existing.dtype) == dtype:
        try:
            array = zarr.open_array(url, mode="r+", storage_options=storage_options(url))
            if attributes:
                array.attrs.update(attributes)  # the stamp now names this split
            return array
        except Exception as e:
            raise _explain(url, e) from None
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
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        return BadInput(f"no credentials for {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile "
                        "or an instance role")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return BadInput(f"access to {url} denied; check the credentials and the bucket's policy")
    what = "zarr volume " if url.rstrip("/").endswith(".zarr") else ""
    return BadInput(f"cannot open {what}{url}: {text}")
