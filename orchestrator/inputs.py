"""Inputs of a submission: local files into the store (content-addressed), models resolved to store URIs."""

from __future__ import annotations

from pathlib import Path

from dlorch.core.errors import BadInput


def upload(c, spec: str, role: str, array=None) -> str:
    """Put a local input in the store, content-addressed; a container (.npz) goes in as the chosen array."""
    import tempfile

    from dlorch.core.imageio import read_image, split_key, write_image
    from dlorch.core.store import image_suffix

    if "://" in spec:
        from dlorch.core.sources import file_url_path
        from dlorch.core.volumes import check_url

        check_url(spec, role)  # a wrong URL, a missing bucket or no credentials fail here, in one line
        if file_url_path(spec) is None:  # nodes read it where it is, if their DLORCH_ALLOW_URLS allows it
            return spec
        spec = file_url_path(spec)  # a file on this machine: uploaded, as a path is (nodes read only the store)
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


def training_inputs(data: dict, task: str, mode: str | None = None) -> dict:
    """A training job's local inputs, read and put through the engine's own checks before anything
    is uploaded or queued: labels on another grid, a label map with gaps or one class, a target of
    another shape, or a mode that does not fit it are one line here, not a failed job on a node.

    Args:
        data: the spec's fields; ``image``, ``labels`` and ``target`` may be local paths (URLs are
            checked by ``upload`` and read by the node).
        task: "segmentation" or "denoising".
        mode: the denoising scheme asked for, None for automatic.

    Returns:
        The arrays read, by role, for ``upload`` to store without reading them again.
    """
    from dlorch.core.imageio import read_image, split_key

    arrays = {}
    for role in ("image", "labels", "target"):
        ref = data.get(role)
        if ref and "://" not in ref:
            path, key = split_key(ref)
            arrays[role] = read_image(path, key, role=role)
    image = arrays.get("image")
    try:
        if image is not None and task == "segmentation" and "labels" in arrays:
            from dlorch.core.engine.inputs import check_labels

            check_labels(image, arrays["labels"])
        if image is not None and task == "denoising":
            from dlorch.core.engine.inputs import check_denoising_inputs

            check_denoising_inputs(image, arrays.get("target"), mode)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return arrays


def model_uri(c, model: str) -> tuple[str, str]:
    """The store URI of a model and its task: a training job's id, a local .ckpt or bioimage.io .zip, or a URL.

    A checkpoint is loaded here as a node would load it, so a wrong file is one line now, naming
    the path the user gave, not a failed job later. A ``file://`` URL is a local path: uploaded.
    """
    from dlorch.core.sources import file_url_path

    model = file_url_path(model) or model
    if Path(model).suffix.lower() == ".zip" and Path(model).is_file():
        return package_uri(c, model)
    if Path(model).exists() or "://" in model:
        uri = c.store.put_blob(Path(model)) if Path(model).exists() else model
        return uri, checkpoint_task(c, uri, shown=model)
    if model.endswith(".ckpt") or "/" in model or "\\" in model:
        raise BadInput(f"model file not found: {model}; pass a .ckpt that exists or a training job's id (`dlorch jobs`)")
    job = c.ledger.get(model)
    if not job.model:
        if not job.spec.trains:
            raise BadInput(f"job {job.id} is a {job.spec.kind} job and makes no model; pass a training job's id or "
                           "a .ckpt")
        if job.status.is_terminal():
            raise BadInput(f"job {job.id} {job.status.value} without a model; `dlorch logs {job.id}` says why")
        raise BadInput(f"job {job.id} has no model yet (it is {job.status.value}); wait for it to succeed")
    return job.model, job.spec.task


def package_uri(c, package: str) -> tuple[str, str]:
    """A bioimage.io package the user named (``dlorch export`` wrote it) as a dlorch checkpoint in the store.

    Only its state-dict weights are read, into dlorch's own network (``zooimport``); its TorchScript
    never runs. Another architecture is refused in one line.
    """
    import tempfile

    from dlorch.orchestrator.zooimport import checkpoint_from_package

    with tempfile.TemporaryDirectory() as tmp:
        task, ckpt = checkpoint_from_package(Path(package), Path(tmp) / "model.ckpt", shown=package)
        uri = c.store.put_blob(ckpt)
    return uri, checkpoint_task(c, uri, shown=package)


def checkpoint_task(c, uri: str, shown: str | None = None) -> str:
    """Which engine task wrote a checkpoint (each keeps its own section in the ``.ckpt``), after loading it."""
    import tempfile

    from dlorch.core.engine.checkpoint import read_checkpoint
    from dlorch.core.engine.denoise.module import CKPT_KEY as DENOISE_KEY
    from dlorch.core.engine.denoise.predict import load_denoiser
    from dlorch.core.engine.segment.predict import load_model

    shown = shown or uri
    with tempfile.TemporaryDirectory() as tmp:
        local = c.store.get_file(uri, Path(tmp) / "m.ckpt")
        try:
            ckpt = read_checkpoint(local, shown)  # tensors and plain values only: a model never runs code here
        except ValueError as e:  # truncated, not a checkpoint, or refused
            raise BadInput(str(e)) from None
        task = "denoising" if DENOISE_KEY in ckpt else "segmentation"
        try:
            (load_denoiser if task == "denoising" else load_model)(local)
        except ValueError as e:
            raise BadInput(str(e).replace(str(local), shown)) from None
    return task
