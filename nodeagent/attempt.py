"""One attempt at one job on this node: fetch inputs, train or predict, checkpoint, report.

Everything this attempt writes goes under ``jobs/<id>/attempts/<token>/`` in the store, and the
orchestrator accepts it only while this attempt holds the lease (fencing).
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dlorch.core.errors import BadInput, one_line
from dlorch.core.imageio import read_grid, read_image, write_image
from dlorch.core.spec import Job
from dlorch.core.store import DataStore
from dlorch.nodeagent.interrupts import StopFlag
from dlorch.nodeagent.nodecache import fetch_cached
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
            task.fetch_extras(self._cached, self._read)  # e.g. accepted labels, a model to start from
        if aux is not None and aux.shape != image.shape:
            raise BadInput(f"{task.aux_role} shape {aux.shape} differs from image shape {image.shape}; "
                           f"give {task.aux_role} on the same grid as the image")
        with self.timed("plan_s"):
            try:
                plan = task.plan_model(self.job.plan) if self.job.plan else task.plan(image, aux, self._voxel_size())
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
            body.update(self._predict_and_upload(result.checkpoint, image))
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
        return {"outcome": "succeeded", **self._predict_and_upload(model, image)}

    def _predict_and_upload(self, checkpoint: Path, image: np.ndarray) -> dict[str, str]:
        """Predict and upload every output (``output``, and ``confidence`` where asked), by name: their URIs."""
        with self.timed("predict_s"):
            results = task_of(self.job.spec).predict_outputs(checkpoint, image)
        fmt = self.job.spec.output_format
        uris = {}
        with self.timed("upload_output_s"):
            for name, result in results.items():
                local = write_image(result, self.workdir / f"{name}.{fmt}", fmt)
                uris[name] = self.store.put_file(local, f"{self.prefix}/{name}.{fmt}")
        return uris

    def _resume_point(self) -> Path | None:
        """The newest readable accepted checkpoint; an unreadable one (truncated, missing) is skipped."""
        if not self.job.checkpoint:
            return None
        history = self.job.checkpoints or [(self.job.epochs_done, self.job.checkpoint)]
        for epochs, uri in reversed(history):
            local = self.workdir / f"resume-{epochs}.ckpt"
            try:
                self.store.get_file(uri, local)
                _check_checkpoint(local, Path(uri).name)
            except Exception as e:  # missing, truncated, or refused: loading it would run code from the file
                log.warning("checkpoint %s unusable (%s: %s); trying the one before", uri, type(e).__name__,
                            one_line(e))
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

    def _voxel_size(self) -> tuple[float, ...] | None:
        """The image file's physical voxel size (OME-Zarr scale, ImageJ TIFF resolution), if it gives one."""
        grid = read_grid(self._cached(self.job.spec.image))
        return tuple(grid.scale) if grid is not None else None

    def _read(self, uri: str | None, role: str) -> np.ndarray:
        if uri is None:
            raise BadInput(f"the job has no {role}")
        return read_image(self._cached(uri), role=role)


class _Hooks:
    """The engine's view of the attempt: when to stop, where checkpoints go."""

    # Checkpoints are uploaded and reported off the training thread (engine runcontrol.CheckpointPublisher).
    background = True

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
            # the engine writes each epoch's checkpoint to a new file and never changes it again
            uri = a.store.put_file(Path(path), f"{a.prefix}/ckpt/epoch-{progress.epochs_done:05d}.ckpt", link=True)
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


def _check_checkpoint(path: Path, shown: str) -> None:
    """Raise unless ``path`` is a complete Lightning checkpoint of tensors and plain values (nothing that runs code)."""
    from dlorch.core.engine.checkpoint import read_checkpoint

    if "state_dict" not in read_checkpoint(path, shown):
        raise ValueError(f"{shown} is not a Lightning checkpoint")
