"""A submission from what a user gave: outputs and inputs checked, inputs uploaded, a job spec built; results taken.

The CLI's commands call these and print; every refusal is a ``BadInput`` whose message is the user's one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlorch.core.errors import BadInput, DlorchError
from dlorch.core.spec import Job, parse_spec
from dlorch.orchestrator.inputs import model_uri, training_inputs, upload


def checked_output_format(out: str | Path, inputs: list[str | None]) -> str:
    """The format an output's suffix asks for, once it is known to destroy none of the ``inputs`` (None: not given).

    A URL stays a string: ``Path()`` would mangle ``s3://``.
    """
    from dlorch.core.imageio import check_output_path, output_format

    fmt = output_format(Path(out))
    check_output_path(out, [r for r in inputs if r])  # before training: a bad output would waste it, or lose data
    return fmt


def check_checkpoint_out(out: Path | None, inputs: list[str | None]) -> None:
    """Where ``train -o`` copies the model: a file path that destroys nothing (see ``check_output_path``)."""
    from dlorch.core.imageio import check_output_path

    if out is not None:
        if out.suffix != ".ckpt":
            raise BadInput(f"-o {out}: a model is written as a .ckpt file; give a name ending in .ckpt")
        check_output_path(out, [r for r in inputs if r], fmt="npy")  # any single-file format: the same rules


def local_output(out: str) -> Path | None:
    """Where the CLI copies a prediction: a local path (``file://`` too), or None for a URL the nodes write to."""
    from dlorch.core.sources import file_url_path

    local = file_url_path(out)
    return Path(local) if local is not None else None if "://" in out else Path(out)


def refuse_urls(refs: dict[str, str | None]) -> None:
    """Training reads its inputs on this machine: a URL (by role) is refused in one line."""
    for role, ref in refs.items():
        if ref and "://" in ref:
            raise BadInput(f"training reads local files, and the {role} is a URL ({ref}); copy it here first "
                           "(`dlorch predict` reads .zarr volumes from s3:// directly)")


def segmentation_spec(c, kind: str, image: str, labels: str, epochs: int | None, time_budget: float | None,
                      priority: int, output_format: str | None = None, tta: bool | None = None,
                      init_from: str | None = None, accepted: str | None = None,
                      accepted_weight: float | None = None, confidence: bool = False) -> dict[str, Any]:
    """A segmentation job (``segment`` or ``train``) on local inputs, checked by the engine, then uploaded.

    ``init_from`` (a training job's id or a .ckpt) starts training from that model's weights;
    ``accepted`` is a second label map of pixels accepted from a prediction, weighed ``accepted_weight``
    relative to the painted ``labels`` in the loss; ``confidence`` (segment) also writes the prediction's
    per-pixel confidence.
    """
    refuse_urls({"image": image, "labels": labels, "accepted labels": accepted})
    if accepted_weight is not None and accepted is None:
        raise BadInput("--accepted-weight weighs accepted labels; give them with --accepted LABELS")
    if accepted_weight is not None and not 0 < accepted_weight <= 1:
        raise BadInput(f"--accepted-weight {accepted_weight:g}: give a weight in (0, 1], relative to painted labels")
    # The engine's own checks, here so that a bad label map fails before it is uploaded and queued.
    arrays = training_inputs({"image": image, "labels": labels}, "segmentation")
    options: dict[str, Any] = {}
    if accepted is not None:
        options["accepted"] = upload(c, accepted, "accepted labels", accepted_labels(arrays, accepted))
        if accepted_weight is not None:
            options["accepted_weight"] = float(accepted_weight)
    if init_from is not None:
        options["init_from"] = init_model_uri(c, init_from)
    spec: dict[str, Any] = {"kind": kind, "image": upload(c, image, "image", arrays["image"]),
                            "labels": upload(c, labels, "labels", arrays["labels"]),
                            "epochs": epochs, "time_budget": time_budget, "priority": priority}
    if output_format is not None:
        spec["output_format"] = output_format
    return _with_options(spec, options, tta, confidence)


def accepted_labels(arrays: dict[str, Any], accepted: str):
    """The accepted label map read from a local file and checked against the painted labels (as the node will)."""
    import numpy as np

    from dlorch.core.engine.inputs import check_accepted
    from dlorch.core.imageio import read_image, split_key

    path, key = split_key(accepted)
    acc = read_image(path, key, role="accepted labels")
    k = int(np.asarray(arrays["labels"]).max())
    try:
        check_accepted(arrays["labels"], acc, k)
    except ValueError as e:
        raise BadInput(str(e)) from None
    return acc


def init_model_uri(c, ref: str) -> str:
    """The store URI of the segmentation model a training starts from (a training job's id, a .ckpt or a URI)."""
    uri, task = model_uri(c, ref)
    if task != "segmentation":
        raise BadInput(f"--init-from {ref} is a {task} model; a segmentation training starts from a segmentation model")
    return uri


def resolve_model_options(c, spec: dict[str, Any]) -> dict[str, Any]:
    """``options.init_from`` given as a training job's id or a local .ckpt, made the model's store URI (nodes
    read only the store); ``spec`` is updated and returned."""
    opts = spec.get("options") or {}
    ref = opts.get("init_from")
    if isinstance(ref, str) and ref and not ref.startswith(c.store.url + "/"):
        spec["options"] = {**opts, "init_from": init_model_uri(c, ref)}
    return spec


def denoising_spec(c, kind: str, image: str, second: str | None, clean: str | None, epochs: int | None,
                   time_budget: float | None, priority: int, output_format: str | None = None) -> dict[str, Any]:
    """A denoising job: Noise2Void on the image alone, Noise2Noise with ``second``, CARE with ``clean``."""
    refuse_urls({"image": image, "second acquisition": second, "clean target": clean})
    if second and clean:
        raise BadInput("give --second (another noisy acquisition) or --clean (a clean target), not both")
    other = second or clean
    mode = "n2n" if second else "care" if clean else None
    try:
        arrays = training_inputs({"image": str(image), "target": other}, "denoising", mode)
    except BadInput as e:  # name the option the user gave, not the spec's field
        raise BadInput(str(e).replace("target shape", "--second shape" if second else "--clean shape")) from None
    spec: dict[str, Any] = {"kind": kind, "task": "denoising", "image": upload(c, str(image), "image", arrays["image"]),
                            "epochs": epochs, "time_budget": time_budget, "priority": priority}
    if other:
        spec |= {"target": upload(c, other, "target", arrays["target"]), "mode": mode}
    if output_format is not None:
        spec["output_format"] = output_format
    return spec


def prediction_spec(c, model: str, image: str, out: str, output_format: str, priority: int,
                    block_voxels: int | None = None, tta: bool | None = None,
                    confidence: bool = False) -> dict[str, Any]:
    """A prediction job with a trained model (a training job's id, a .ckpt, or a URL) on an image or a volume."""
    model_ref, task = model_uri(c, model)
    if task == "denoising" and tta is not None:
        raise BadInput(f"--tta/--no-tta apply to segmentation models; {model} is a denoising model")
    if task == "denoising" and confidence:
        raise BadInput(f"--confidence applies to segmentation models; {model} is a denoising model")
    spec: dict[str, Any] = {"kind": "predict", "task": task, "image": upload(c, image, "image"), "model": model_ref,
                            "priority": priority, "output_format": output_format}
    if local_output(out) is None:  # a URL (s3://bucket/out.zarr): blocks write there directly
        spec["output"] = out
    options: dict[str, Any] = {"block_voxels": block_voxels} if block_voxels else {}
    if str(out).lower().rstrip("/").endswith(".ome.zarr"):  # a blockwise output is laid out as OME-Zarr
        options["write_ome_zarr"] = True
    return _with_options(spec, options, tta, confidence)


def _with_options(spec: dict[str, Any], options: dict[str, Any], tta: bool | None, confidence: bool) -> dict[str, Any]:
    """The spec with its engine options (test-time augmentation and the confidence map where asked), if any."""
    if tta is not None:
        options["tta"] = tta
    if confidence:
        options["confidence"] = True
    if options:
        spec["options"] = options
    return spec


def confidence_path(out: Path) -> Path:
    """Where the CLI copies a prediction's confidence map: beside ``out``, ``seg.tif`` -> ``seg.confidence.tif``."""
    return out.with_name(f"{out.stem}.confidence{out.suffix}")


def training_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The training job of a ``dlorch segment`` spec trained as candidates: its prediction's options left out."""
    options = {k: v for k, v in spec.get("options", {}).items() if k not in ("tta", "confidence")}
    return {**spec, "kind": "train", "options": options}


def prediction_after_training(spec: dict[str, Any], model: str) -> dict[str, Any]:
    """``dlorch segment``'s prediction with the model its training chose: same image, output format and options."""
    options = {k: v for k, v in spec.get("options", {}).items() if k in ("tta", "confidence")}  # training's stay
    return {"kind": "predict", "image": spec["image"], "model": model, "priority": spec["priority"],
            "output_format": spec["output_format"], "options": options}


def read_spec_file(spec_file: Path, out: Path | None) -> dict[str, Any]:
    """A JobSpec from a JSON file, checked before anything is uploaded; with ``out``, its output format set from it."""
    if not spec_file.is_file():
        raise BadInput(f"spec file not found: {spec_file}" if not spec_file.exists() else
                       f"spec {spec_file} is a directory; pass the JSON file")
    try:
        data = json.loads(spec_file.read_text())
    except ValueError as e:
        raise BadInput(f"spec {spec_file} is not valid JSON: {e}") from None
    parse_spec(data)  # fail on a bad field before uploading anything
    if data.get("output"):
        _check_spec_output(spec_file, data["output"], [data.get(r) for r in ("image", "labels", "target")])
    if out is not None:  # the result is copied as it was written: the suffix must say the same format
        fmt = checked_output_format(out, [data.get(r) for r in ("image", "labels", "target")])
        if data.get("output_format", fmt) != fmt:
            raise BadInput(f"-o {out} asks for {fmt} but the spec's output_format is {data['output_format']}")
        data["output_format"] = fmt
    return data


def _check_spec_output(spec_file: Path, output: str, inputs: list[str | None]) -> None:
    """A spec's ``output`` is a URL the nodes write to: a path on this machine is refused (nodes write only
    their store and the prefixes they allow), after the checks that it would destroy nothing."""
    from dlorch.core.imageio import check_output_path

    check_output_path(output, [r for r in inputs if r], fmt="zarr")
    local = local_output(output)
    if local is not None:
        raise BadInput(f"spec {spec_file}: output {output} is a path on this machine, and nodes write only to the "
                       f"store or a URL they allow; leave output out and pass `-o {local}` with --wait (the result is "
                       "copied there), or give an s3:// URL")


def upload_spec_inputs(c, data: dict[str, Any]) -> dict[str, Any]:
    """A spec file's local image, labels, target and model put in the store (``data`` is updated and returned)."""
    spec = parse_spec(data)
    # A training job's inputs get the engine's checks here (labels on the image's grid, a target of
    # its shape), as `dlorch segment` gives them, instead of failing on a node after its retries.
    arrays = training_inputs(data, spec.task, spec.mode) if spec.trains else {}
    for role in ("image", "labels", "target"):
        value = data.get(role)
        if value and not value.startswith(c.store.url):
            data[role] = upload(c, value, role, arrays.get(role))
    accepted = (data.get("options") or {}).get("accepted")
    if accepted and not accepted.startswith(c.store.url):
        acc = accepted_labels(arrays, accepted) if "labels" in arrays and "://" not in accepted else None
        data["options"] = {**data["options"], "accepted": upload(c, accepted, "accepted labels", acc)}
    resolve_model_options(c, data)
    if data.get("model") and not data["model"].startswith(c.store.url):  # a .ckpt, a URL or a training job's id
        data["model"], task = model_uri(c, data["model"])
        data.setdefault("task", task)
    return data


def candidate_specs(spec: dict[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """One training spec per model variant (by name) for ``--candidates N``, checked before any is submitted."""
    from dlorch.core.engine.segment.zoo import candidate_names

    try:
        names = candidate_names(n)
    except ValueError as e:
        raise BadInput(str(e)) from None
    specs = {v: {**spec, "options": {**spec.get("options", {}), "variant": v}, "name": f"candidate {v}"}
             for v in names}
    parse_spec(specs[names[0]])
    return specs


def best_candidate(finals: list[Job]) -> Job:
    """The succeeded candidate with the best held-out stroke IoU (then the lowest validation loss)."""
    ok = [j for j in finals if j.status.value == "succeeded"]
    if not ok:
        raise DlorchError("no candidate succeeded; see `dlorch jobs` and `dlorch logs JOB`")
    return max(ok, key=lambda j: (j.metrics.get("best_val_iou", 0.0), -j.metrics.get("val_loss", 0.0)))


def _copy_result(c, job: Job, result: str, out: Path) -> None:
    """Copy a result to ``out``; an image result (TIFF, OME-Zarr) gets the input's axes and voxel size, and an
    ``.ome.zarr`` asked of a job that wrote one array (not blockwise) is laid out as an OME-Zarr pyramid here."""
    import tempfile

    from dlorch.core.imageio import open_zarr_array, read_grid, read_image, write_image
    from dlorch.core.store import image_suffix

    suffix = image_suffix(out)
    if job.spec.kind == "train" or suffix not in (".tif", ".tiff", ".ome.zarr") or \
            (job.spec.blockwise and suffix == ".ome.zarr"):
        c.fetch(result, out)  # blockwise OME-Zarr outputs are written as pyramids by the nodes
        return
    grid = read_grid(job.spec.image) if "://" not in job.spec.image or job.spec.image.startswith("s3://") \
        else read_grid(job.spec.image.split("://", 1)[1])
    if grid is None and suffix != ".ome.zarr":
        c.fetch(result, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = c.fetch(result, Path(tmp) / f"result{image_suffix(Path(result))}")
        # a zarr result is read block by block as its pyramid is written: a volume is never whole in memory here
        array = open_zarr_array(local) if image_suffix(local) == ".zarr" else read_image(local)
        write_image(array, out, labels=job.spec.task == "segmentation", grid=grid)


def take_result(c, job: Job, out: Path | None) -> str | Path | None:
    """Where a finished job's result now is: its spec's output URL, or ``out`` once copied there; None if neither.

    A job that did not succeed raises its error, or points at its log.
    """
    if job.status.value != "succeeded":
        raise DlorchError(f"job {job.id} {job.status.value}: {job.error or 'see `dlorch logs ' + job.id + '`'}")
    result = job.output if job.spec.kind != "train" else job.model
    if job.spec.output:
        return job.spec.output
    if out is not None and result:
        _copy_result(c, job, result, Path(out))
        if job.confidence:
            c.fetch(job.confidence, confidence_path(Path(out)))
        return out
    return None
