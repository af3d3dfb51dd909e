"""What the napari widget asks of dlorch, without Qt: submit layers as jobs, follow them, take their results.

Runs in a worker thread; every call goes through the same client as the CLI (embedded or remote queue).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dlorch.core.errors import DlorchError


@dataclass
class Progress:
    """One report to the widget: a line of text and a fraction done."""

    text: str
    fraction: float


@dataclass
class Result:
    """A result layer to add: its data, name and kind ("labels" or "image")."""

    data: np.ndarray
    name: str
    kind: str


def _save(array: np.ndarray, folder: Path, name: str) -> str:
    path = folder / f"{name}.npy"
    np.save(path, np.asarray(array), allow_pickle=False)
    return str(path)


def _wait(c, ids: list[str], label: str, poll_s: float = 0.5) -> Iterator[Progress | list]:
    """Follow jobs until all have ended; yields progress, then the list of final jobs."""
    while True:
        jobs = [c.ledger.get(j) for j in ids]
        done = sum(j.status.is_terminal() for j in jobs)
        frac = sum(1.0 if j.status.is_terminal() else (j.epochs_done / j.epochs_total if j.epochs_total else 0.0)
                   for j in jobs) / len(jobs)
        yield Progress(f"{label}: {done}/{len(jobs)} done ({', '.join(j.status.value for j in jobs)})", frac)
        if done == len(jobs):
            yield jobs
            return
        time.sleep(poll_s)


def run_segmentation(c, image: np.ndarray, labels: np.ndarray, candidates: int = 1, epochs: int | None = None,
                     time_budget: float | None = None) -> Iterator[Progress | Result]:
    """Train ``candidates`` segmentation models on the painted labels, then segment the image with each.

    Yields progress while the jobs run, then one labels ``Result`` per succeeded candidate, named
    with its variant and held-out stroke IoU.
    """
    from dlorch.orchestrator import submit

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = submit.segmentation_spec(c, "train", _save(image, folder, "image"), _save(labels, folder, "labels"),
                                        epochs, time_budget, 0, output_format="npy")
        specs = submit.candidate_specs(spec, candidates) if candidates > 1 else {"default": spec}
        ids = {c.submit(s): v for v, s in specs.items()}
        trained = yield from _follow(c, list(ids), "training")
        predictions = {}
        for job in trained:
            if job.status.value == "succeeded":
                pred = submit.prediction_after_training({**spec, "output_format": "npy"}, job.model)
                predictions[c.submit(pred)] = job
        finals = yield from _follow(c, list(predictions), "segmenting")
        for pred in finals:
            job = predictions[pred.id]
            if pred.status.value != "succeeded":
                continue
            score = job.metrics.get("best_val_iou")
            name = f"dlorch {ids[job.id]}" + (f" IoU {score:.3f}" if score is not None else "")
            yield Result(_fetch(c, pred.output, folder), name, "labels")
        if not any(p.status.value == "succeeded" for p in finals):
            raise DlorchError("no model succeeded; see `dlorch jobs` and `dlorch logs JOB`")


def run_denoising(c, image: np.ndarray, epochs: int | None = None,
                  time_budget: float | None = None) -> Iterator[Progress | Result]:
    """Denoise the image (Noise2Void); yields progress, then the denoised image."""
    from dlorch.orchestrator import submit

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = submit.denoising_spec(c, "denoise", _save(image, folder, "image"), None, None, epochs, time_budget, 0,
                                     output_format="npy")
        (job,) = yield from _follow(c, [c.submit(spec)], "denoising")
        if job.status.value != "succeeded":
            raise DlorchError(f"job {job.id} {job.status.value}: {job.error or 'see dlorch logs ' + job.id}")
        yield Result(_fetch(c, job.output, folder), "dlorch denoised", "image")


def _follow(c, ids: list[str], label: str):
    finals: list[Any] = []
    for item in _wait(c, ids, label):
        if isinstance(item, list):
            finals = item
        else:
            yield item
    return finals


def _fetch(c, uri: str, folder: Path) -> np.ndarray:
    from dlorch.core.imageio import read_image

    local = c.fetch(uri, folder / f"result-{abs(hash(uri))}{Path(uri).suffix}")
    return read_image(local)


def listing(c) -> tuple[list[list[str]], list[list[str]]]:
    """Rows for the jobs table (id, name, status, progress) and the nodes table (id, job, heartbeat age)."""
    now = time.time()
    jobs = sorted(c.ledger.jobs(), key=lambda j: j.created_at, reverse=True)[:50]
    job_rows = [[j.id, j.spec.name or j.spec.kind, j.status.value,
                 f"{j.epochs_done}/{j.epochs_total}" if j.epochs_total else ""] for j in jobs]
    node_rows = [[n.id, getattr(n, "job", None) or "", f"{now - n.heartbeat_at:.0f} s"]
                 for n in c.nodes(now)]
    return job_rows, node_rows
