"""Inputs of a submission: local files into the store (content-addressed), models resolved to store URIs."""

from __future__ import annotations

from pathlib import Path

from dlorch.core.errors import BadInput


def upload(c, spec: str, role: str, array=None) -> str:
    """Put a local input in the store, content-addressed; a container (.npz) goes in as the chosen array."""
    import tempfile

    from dlorch.core.imageio import read_image, split_key, write_image
    from dlorch.core.store import image_suffix

    if "://" in spec:  # already where every node can read it
        if spec.rstrip("/").endswith(".zarr"):
            from dlorch.core.volumes import open_volume

            open_volume(spec)  # a wrong URL or missing bucket fails here, in one line
        return spec
    path, key = split_key(spec)
    if not path.exists():
        raise BadInput(f"{role} file not found: {path}")
    if image_suffix(path) in (".zarr", ".ome.zarr"):
        from dlorch.core.volumes import open_volume

        open_volume(str(path))  # check it opens, without reading a volume that may exceed memory
        return c.store.put_blob(path)
    if image_suffix(path) != ".npz":
        if array is None:
            read_image(path, key, role=role)  # fail here, with a clear line, on an unreadable file
        return c.store.put_blob(path)
    arr = array if array is not None else read_image(path, key, role=role)
    with tempfile.TemporaryDirectory() as tmp:
        return c.store.put_blob(write_image(arr, Path(tmp) / f"{role}.npy", "npy"))


def model_uri(c, model: str) -> tuple[str, str]:
    """The store URI of a model and its task: a training job's id, a local .ckpt, or a URL."""
    if Path(model).exists() or "://" in model:
        uri = c.store.put_blob(Path(model)) if Path(model).exists() else model
        return uri, checkpoint_task(c, uri)
    job = c.ledger.get(model)
    if not job.model:
        raise BadInput(f"job {job.id} has no model yet (it is {job.status.value}); wait for it to succeed")
    return job.model, job.spec.task


def checkpoint_task(c, uri: str) -> str:
    """Which engine task wrote a checkpoint: each keeps its own section in the ``.ckpt``."""
    import tempfile

    import torch

    from dlorch.core.engine.denoise_module import CKPT_KEY as DENOISE_KEY

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = torch.load(c.store.get_file(uri, Path(tmp) / "m.ckpt"), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a checkpoint, or unsafe to load
            raise BadInput(f"{uri} is not a readable model checkpoint: {type(e).__name__}") from None
    return "denoising" if isinstance(ckpt, dict) and DENOISE_KEY in ckpt else "segmentation"
