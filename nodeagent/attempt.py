"""One attempt at one job on this node: fetch inputs, train or predict, checkpoint, report.

Everything this attempt writes goes under ``jobs/<id>/attempts/<token>/`` in the store, and the
orchestrator accepts it only while this attempt holds the lease (fencing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dlorch.core.errors import BadInput, Unreachable
from dlorch.core.imageio import read_image, write_image
from dlorch.core.spec import Job
from dlorch.core.store import DataStore, sha256_of
from dlorch.nodeagent.interrupts import StopFlag
from dlorch.nodeagent.tasks import task_of

log = logging.getLogger("dlorch.agent")

Report = Callable[[dict[str, Any]], dict[str, Any]]


class LeaseLost(Exception):
    """The orchestrator no longer accepts this attempt's work: stop, write nothing more."""


class Attempt:
    """Runs one attempt and returns the ``finish`` report for the orchestrator."""

    def __init__(self, job: Job, token: int, store: DataStore, report: Report, stop: StopFlag,
                 lease_lost: StopFlag, workdir: Path, cache: Path) -> None:
        self.job, self.token, self.store, self.report = job, token, store, report
        self.stop, self.lease_lost = stop, lease_lost
        self.workdir, self.cache = workdir, cache
        self.prefix = f"jobs/{job.id}/attempts/{token}"
        self.timings: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str):
        """Add the block's wall time to ``timings[name]`` (recorded with the attempt)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def run(self) -> dict[str, Any]:
        """Run to the end, a hand-back or an error; returns the finish message body."""
        t0 = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            body = self._predict_only() if self.job.spec.kind == "predict" else self._train()
        except LeaseLost as e:
            body = {"outcome": "cancelled", "error": f"lease lost: {e}"}
        except BadInput as e:  # the input can never work: no point retrying elsewhere
            body = {"outcome": "errored", "error": str(e), "permanent": True}
        except Exception as e:  # a bad job never takes down the agent
            log.exception("attempt %s of %s raised", self.token, self.job.id)
            body = {"outcome": "errored", "error": f"{type(e).__name__}: {e}"}
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["total_s"] = time.perf_counter() - t0
        return {**body, "timings": self.timings}

    # -- job kinds ----------------------------------------------------------------------------------
    def _train(self) -> dict[str, Any]:
        spec = self.job.spec
        task = task_of(spec)
        with self.timed("fetch_inputs_s"):
            image = self._read(spec.image, "image")
            aux = self._read(getattr(spec, task.aux_role), task.aux_role) if task.aux_role else None
        if aux is not None and aux.shape != image.shape:
            raise BadInput(f"{task.aux_role} shape {aux.shape} differs from image shape {image.shape}; "
                           f"give {task.aux_role} on the same grid as the image")
        with self.timed("plan_s"):
            try:
                plan = task.plan_model(self.job.plan) if self.job.plan else task.plan(image, aux)
            except ValueError as e:  # the engine's verdict on the data (no labels, one class, ...)
                raise BadInput(str(e)) from None
        with self.timed("fetch_checkpoint_s"):
            resume = self._resume_point()
        hooks = _Hooks(self, plan.model_dump(mode="json"), plan.epochs)
        with self.timed("train_s"):
            result = task.train(image, aux, plan, workdir=self.workdir / "train", resume_from=resume, hooks=hooks)
        total = result.epochs_total or plan.epochs  # training may have re-fitted the count to the budget
        body: dict[str, Any] = {"epochs_done": result.epochs_done, "epochs_total": total,
                                "plan": plan.model_dump(mode="json"), "metrics": result.metrics,
                                "checkpoint": hooks.last_uri}
        if result.stopped_by == "stop_request" and result.epochs_done < total:
            return {**body, "outcome": "handed_back"}
        if result.stopped_by in ("time_budget", "plateau"):
            body["epochs_total"] = result.epochs_done  # the budget capped the count, or training had converged
        with self.timed("upload_model_s"):
            body["model"] = self.store.put_file(result.checkpoint, f"{self.prefix}/model.ckpt")
        if spec.kind in ("segment", "denoise"):
            body["output"] = self._predict_and_upload(result.checkpoint, image)
        return {**body, "outcome": "succeeded"}

    def _predict_only(self) -> dict[str, Any]:
        spec = self.job.spec
        if spec.blockwise:
            from dlorch.nodeagent import blockwise

            with self.timed("fetch_model_s"):
                model = self._cached(spec.model, ".ckpt")
            return blockwise.split(self, model)
        with self.timed("fetch_inputs_s"):
            image = self._read(spec.image, "image")
        with self.timed("fetch_model_s"):
            model = self._cached(spec.model, ".ckpt")
        return {"outcome": "succeeded", "output": self._predict_and_upload(model, image)}

    def _predict_and_upload(self, checkpoint: Path, image: np.ndarray) -> str:
        with self.timed("predict_s"):
            result = task_of(self.job.spec).predict(checkpoint, image)
        fmt = self.job.spec.output_format
        with self.timed("upload_output_s"):
            local = write_image(result, self.workdir / f"output.{fmt}", fmt)
            return self.store.put_file(local, f"{self.prefix}/output.{fmt}")

    def _resume_point(self) -> Path | None:
        """The newest readable accepted checkpoint; an unreadable one (truncated, missing) is skipped."""
        if not self.job.checkpoint:
            return None
        history = self.job.checkpoints or [(self.job.epochs_done, self.job.checkpoint)]
        for epochs, uri in reversed(history):
            local = self.workdir / f"resume-{epochs}.ckpt"
            try:
                self.store.get_file(uri, local)
                _check_checkpoint(local)
            except Exception as e:
                log.warning("checkpoint %s unusable (%s: %s); trying the one before", uri, type(e).__name__, e)
                continue
            if uri != self.job.checkpoint:
                reply = self.report({"type": "progress", "epochs_done": epochs, "resumed_from": uri,
                                     "why": "newer checkpoint unreadable"})
                if not reply.get("ok") and not reply.get("unreachable"):
                    raise LeaseLost(reply.get("reason", "resume rejected"))
            return local
        reply = self.report({"type": "progress", "epochs_done": 0, "resumed_from": "",
                             "why": "no readable checkpoint"})
        if not reply.get("ok") and not reply.get("unreachable"):
            raise LeaseLost(reply.get("reason", "restart rejected"))
        log.warning("no readable checkpoint: training starts over")
        return None

    # -- data ---------------------------------------------------------------------------------------
    def _cached(self, uri: str, suffix: str = "") -> Path:
        return fetch_cached(self.store, self.cache, uri, self.timings)

    def _read(self, uri: str | None, role: str) -> np.ndarray:
        if uri is None:
            raise BadInput(f"the job has no {role}")
        return read_image(self._cached(uri), role=role)


class _Hooks:
    """The engine's view of the attempt: when to stop, where checkpoints go."""

    def __init__(self, attempt: Attempt, plan: dict[str, Any], epochs_total: int) -> None:
        self.attempt, self.plan, self.epochs_total = attempt, plan, epochs_total
        self.last_uri: str | None = attempt.job.checkpoint

    def should_stop(self) -> bool:
        # A lost lease abandons the epoch at once: its checkpoint could never be accepted (fencing),
        # and another node already runs the job from the last accepted one. A stop request (drain,
        # SIGTERM) instead finishes the epoch, whose checkpoint is accepted: no progress is lost.
        if self.attempt.lease_lost.is_set():
            raise LeaseLost(self.attempt.lease_lost.reason or "lease lost")
        return self.attempt.stop.is_set()

    def on_checkpoint(self, path: Path, progress: Any) -> None:
        a = self.attempt
        if a.lease_lost.is_set():
            raise LeaseLost(a.lease_lost.reason or "lease lost")
        with a.timed("upload_checkpoint_s"):
            uri = a.store.put_file(Path(path), f"{a.prefix}/ckpt/epoch-{progress.epochs_done:05d}.ckpt")
        self.epochs_total = progress.epochs_total  # re-fitted to the time budget as training runs
        reply = a.report({"type": "progress", "epochs_done": progress.epochs_done,
                          "epochs_total": self.epochs_total, "checkpoint": uri, "plan": self.plan,
                          "metrics": dict(progress.metrics)})
        if reply.get("unreachable"):  # the queue is down, not our lease: keep training, report later
            log.warning("progress not reported (queue unreachable); continuing")
        elif not reply.get("ok"):
            a.lease_lost.set(reply.get("reason", "progress rejected"))
            raise LeaseLost(reply.get("reason", "progress rejected"))
        self.last_uri = uri
        log.info("epoch %d/%d checkpointed %s", progress.epochs_done, self.epochs_total,
                 " ".join(f"{k}={v:.4g}" for k, v in progress.metrics.items()))


def fetch_cached(store: DataStore, cache: Path, uri: str, timings: dict[str, float]) -> Path:
    """Fetch a store object once per node, checking a cached copy before it is used.

    A blob (``.../blobs/<sha256><suffix>``) is content-addressed: its copy must hash to its name
    (hashed once per process, not per block). Another object's copy must have the store object's
    size. A copy that fails is deleted and fetched again. A download lands under a temporary name
    and is renamed once checked, so a node killed mid-download leaves no truncated copy behind.
    Downloads are counted in ``timings["downloads"]``: a model reaches each node once, not once per block.
    """
    name = uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    digest = _blob_digest(uri)
    if digest is None:
        name = f"{hashlib.sha1(uri.encode()).hexdigest()[:12]}-{name}"
    local = cache / name
    if local.exists():
        fault = _copy_fault(store, uri, local, digest)
        if fault is None:
            return local
        log.warning("cached copy %s of %s is damaged (%s); fetching it again", local, uri, fault)
        _remove(local)
    if not store.exists(uri):
        raise BadInput(f"not found in the store: {uri}")
    t0 = time.perf_counter()
    tmp = local.with_name(f".{local.name}.fetch-{uuid.uuid4().hex[:8]}")
    try:
        store.get_file(uri, tmp)
        fault = _copy_fault(store, uri, tmp, digest)
        if fault is not None:
            raise BadInput(f"{uri} in the store is damaged ({fault}); submit the file again")
        if not local.exists():  # else another worker of this node published it meanwhile: keep theirs
            os.replace(tmp, local)
            if digest is not None:  # hashed as tmp; the rename keeps size and mtime
                with _verified_lock:
                    _verified[str(local)] = _stamp(local)
    finally:
        _remove(tmp)
    timings["download_s"] = timings.get("download_s", 0.0) + time.perf_counter() - t0
    timings["downloads"] = timings.get("downloads", 0) + 1
    return local


_verified: dict[str, tuple[int, int]] = {}  # cached blob copies hashed by this process: path -> (size, mtime)
_verified_lock = threading.Lock()


def _blob_digest(uri: str) -> str | None:
    """The sha256 a blob's name declares (``put_blob`` names blobs by content), or None for another object."""
    path = "/" + uri.replace("\\", "/").rstrip("/")
    head, _, name = path.rpartition("/")
    m = re.match(r"[0-9a-f]{64}", name)
    return m.group(0) if m and head.endswith("/blobs") else None


def _copy_fault(store: DataStore, uri: str, local: Path, digest: str | None) -> str | None:
    """Why a local copy of ``uri`` cannot be used, or None if it matches the store object."""
    if digest is not None:
        stamp = _stamp(local)
        with _verified_lock:
            if _verified.get(str(local)) == stamp:
                return None
        actual = sha256_of(local)
        if actual != digest:
            return f"sha256 {actual[:12]}... is not the {digest[:12]}... of its name"
        with _verified_lock:
            _verified[str(local)] = stamp
        return None
    try:
        want = _store_size(store, uri)
    except Unreachable as e:  # the copy was published whole (rename): better than no work at all
        log.warning("cannot check cached copy %s against the store (%s); using it", local, e)
        return None
    have = sum(f.stat().st_size for f in local.rglob("*") if f.is_file()) if local.is_dir() else local.stat().st_size
    return None if have == want else f"{have} bytes, the store's copy has {want}"


def _store_size(store: DataStore, uri: str) -> int:
    """Bytes of a store object (a directory: all its files)."""
    try:
        return store.size(uri)
    except FileNotFoundError:
        raise BadInput(f"not found in the store: {uri}") from None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _remove(path: Path) -> None:
    with _verified_lock:
        _verified.pop(str(path), None)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _check_checkpoint(path: Path) -> None:
    """Raise unless ``path`` is a complete, loadable Lightning checkpoint."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError("not a Lightning checkpoint")
