"""Blockwise prediction on a node: plan a volume's blocks (the parent job), or run blocks.

A block reads its core plus a halo from the input zarr, predicts, crops the halo and writes its
core into the output zarr. Nodes pull blocks from the orchestrator, which leases them in memory
(``orchestrator/blockbook.py``). Blocks are whole zarr chunks, so concurrent writers never share a chunk,
and the same block always writes the same bytes: a block re-run after a kill is harmless.

The output array is stamped with its job and split (the planner attempt's token, see
``core/volumes.py``): a planner refuses another job's output and a newer split's (it is stale: its
lease ran out while it was paused, and the output may already hold done blocks), and every block
write first checks that the array is still the one its split created.
"""

from __future__ import annotations

import math
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dlorch.core import protocol
from dlorch.core.blocks import Block, choose_block_voxels, output_chunks, plan_blocks
from dlorch.core.chunkfiles import chunk_files
from dlorch.core.errors import BadInput, StaleWrite, Unreachable
from dlorch.core.protocol import BlockDone, BlockFailed, BlockRelease, NextBlock, NextBlockReply
from dlorch.core.spec import JobSpec
from dlorch.core.store import DataStore
from dlorch.core.volumes import check_block_output, check_output_volume, create_volume, open_volume, read_region
from dlorch.nodeagent.attempt import LeaseLost
from dlorch.nodeagent.hardware import total_memory_bytes
from dlorch.nodeagent.interrupts import StopFlag
from dlorch.nodeagent.nodecache import fetch_cached
from dlorch.nodeagent.reports import report
from dlorch.nodeagent.tasks import LoadedModel, Task, task_of
from dlorch.orchestrator.queue import Queue

if TYPE_CHECKING:
    from dlorch.nodeagent.attempt import Attempt

log = logging.getLogger("dlorch.agent")

# Slices read to estimate the volume's intensity statistics (shared by every block).
STAT_SLICES = 16

_models: dict[str, LoadedModel] = {}  # loaded networks of this process, by local checkpoint path


def _model(path: Path, task: Task) -> LoadedModel:
    """Load a checkpoint's network once per process (blocks of one job share it)."""
    key = str(path)
    if key not in _models:
        _models.clear()  # one model at a time keeps memory bounded
        _models[key] = task.load(path)
    return _models[key]


def split(attempt: "Attempt", checkpoint: Path) -> dict[str, Any]:
    """Plan the blocks of a volume, create the output array stamped with this split, and return the ``split`` report.

    Each block reads the whole volume's prediction windows that touch its core, along the axes the
    network sees (in-plane for a 2D network, along Z as well for a 3D one), plus for denoising the
    posterior step's reach: it then computes exactly what one pass over the volume computes there,
    so block borders leave no trace. What the blocks share (intensity statistics and class priors,
    or the noise level) is measured here once, on a sample of the volume.

    A planner whose output already belongs to a newer split of the job raises ``LeaseLost`` and
    touches nothing; another job's output is ``BadInput``.
    """
    try:
        return _split(attempt, checkpoint)
    except StaleWrite as e:
        raise LeaseLost(str(e)) from None


def _split(attempt: "Attempt", checkpoint: Path) -> dict[str, Any]:
    job, spec = attempt.job, attempt.job.spec
    owner = (job.id, attempt.token)
    task = task_of(spec)
    with attempt.timed("model_load_s"):
        model = _model(checkpoint, task)
    with attempt.timed("plan_blocks_s"):
        output = spec.output or attempt.store.uri(f"jobs/{job.id}/output.zarr")
        attempt.store.check_source(spec.image)  # a node opens only its store and the prefixes it allows
        attempt.store.check_source(output, "write")
        check_output_volume(output, spec.image, owner)  # before any work: the output must destroy nothing
        vol = open_volume(spec.image)
        if vol.ndim not in (2, 3):
            raise BadInput(f"blockwise prediction takes a 2D or 3D volume; {spec.image} has shape {vol.shape}")
        shape = tuple(vol.shape)
        sample = _calibration_sample(vol, spec.image, model.plan)
    with attempt.timed("calibrate_s"):
        shared, voxels_per_s = task.calibrate(sample, model)
    with attempt.timed("plan_blocks_s"):
        reach, out = task.reach(model.plan, shape), task.block_output(model.plan)
        if spec.options.get("block_voxels"):
            target = int(spec.options["block_voxels"])
        else:
            target = choose_block_voxels(voxels_per_s, total_memory_bytes(), out.bytes_per_voxel)
        blocks = plan_blocks(shape, tuple(vol.chunks), (0,) * vol.ndim, target, reach)
        block = tuple(b - a for a, b in blocks[0].core)  # the first block has the whole block shape
        chunks = output_chunks(block, tuple(vol.chunks), np.dtype(out.dtype).itemsize)
        if attempt.lease_lost.is_set():  # paused past the lease: another planner may own the output now
            raise LeaseLost(attempt.lease_lost.reason or "lease lost")
        _create_output(spec, output, shape, chunks, out, str(vol.dtype), owner)  # checks the stamp again
    return {"outcome": "split", "output": output, **shared, "voxels": math.prod(shape),
            "blocks": [{"index": b.index, "core": b.core, "read": b.read} for b in blocks]}


def _create_output(spec: JobSpec, output: str, shape: tuple[int, ...], chunks: tuple[int, ...], out: Any,
                   image_dtype: str, owner: tuple[str, int]) -> None:
    """Create the output array; or an OME-Zarr pyramid where one is asked for (an ``.ome.zarr`` output, the
    ``write_ome_zarr`` option) or the input is OME-Zarr: then a segmentation goes under ``labels/`` of a copy of
    an OME-Zarr input, and the input's axes and voxel size carry over. Either is stamped with ``owner``."""
    from dlorch.core import omezarr
    from dlorch.core.volumes import STAMP

    attributes = {"model": spec.model, **out.attributes}
    ome_input = omezarr.is_ome_zarr(spec.image)
    if not (spec.options.get("write_ome_zarr") or output.rstrip("/").endswith(".ome.zarr") or ome_input):
        create_volume(output, shape, chunks, out.dtype, attributes=attributes, input_url=spec.image, owner=owner)
        return
    labels = spec.task == "segmentation"
    pyramid = omezarr.plan_pyramid(output, shape, chunks, omezarr.read_grid(spec.image), labels,
                                   with_image=labels and ome_input)
    check_output_volume(output, spec.image, owner)  # just before writing, as create_volume does
    attributes[STAMP] = {"job": owner[0], "split": owner[1]}
    if omezarr.same_layout(omezarr.load_pyramid(output), pyramid):
        omezarr.restamp(output, attributes)  # this split's stamp; blocks written so far stay
    else:
        omezarr.create_pyramid(pyramid, out.dtype, image_dtype, attributes)


def _calibration_sample(vol: Any, url: str, plan: Any) -> np.ndarray:
    """The part of the volume the calibration measures: a central slab for a 3D network, else spread slices."""
    shape = tuple(vol.shape)
    if vol.ndim == 3 and plan.spatial_dims == 3:  # a 3D network needs neighbouring slices: a central slab
        box = [min(n, 2 * r) for n, r in zip(shape, plan.infer_roi)]
        box[0] = min(shape[0], plan.infer_roi[0])
        slab = tuple(slice((n - b) // 2, (n - b) // 2 + b) for n, b in zip(shape, box))
        return read_region(vol, url, slab)
    if vol.ndim == 3:
        picks = np.unique(np.linspace(0, shape[0] - 1, min(STAT_SLICES, shape[0])).astype(int))
        return np.stack([read_region(vol, url, int(z)) for z in picks])
    return read_region(vol, url, ...)


@dataclass
class _Context:
    """What every block of one blockwise job shares on this node."""

    spec: JobSpec
    task: Task
    output: str
    owner: tuple[str, int | None]  # (job, split) the output's stamp must name; split None: a plan from before stamps
    calibration: dict[str, Any]  # the volume's shared values, as Task.compute takes them
    checkpoint: Path
    source: Any  # the open input array
    sink: Any = None  # the open output array (opened on first write)
    pyramid: Any = None  # an OME-Zarr output's levels (``omezarr.Pyramid``, opened), written instead of ``sink``


def _compute(r: "_Ready", model: LoadedModel) -> np.ndarray:
    """A block's output core: labels (uint8) or the denoised image (float32)."""
    return r.ctx.task.compute(model, r.region, r.block.crop(), r.ctx.calibration,
                              volume_shape=tuple(r.ctx.source.shape), origin=tuple(a for a, _ in r.block.read))


@dataclass
class _Ready:
    """A leased block whose input is read (or whose read failed), ready to compute."""

    job_id: str
    block: Block
    ctx: _Context | None
    region: np.ndarray | None = None
    error: str | None = None
    permanent: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class BlockWorker:
    """Pulls blocks from the orchestrator and runs them, reading the next while the current computes.

    One thread leases and reads the next block (``next_block`` request, input read with its halo)
    while this one predicts and writes the current, so IO and orchestration overlap compute. A
    block's done report rides on the next ``next_block`` request (one round trip per block), or goes
    one-way when the node stops asking; if it is lost, the lease runs out and the block simply runs again.
    """

    def __init__(self, node_id: str, store: DataStore, cache: Path, main: Queue, side: Queue,
                 stop: StopFlag) -> None:
        self.node_id, self.store, self.cache = node_id, store, cache
        self.main, self.side, self.stop = main, side, stop
        self.contexts: dict[str, _Context] = {}
        self.models: set[str] = set()  # model URIs this node holds (affinity)
        self.held: set[tuple[str, int]] = set()  # leased blocks, renewed by the heartbeat
        self.lost: set[str] = set()  # jobs the orchestrator no longer hands blocks of (cancelled, failed)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._report_s = 0.0
        self._done: list[dict[str, Any]] = []  # done reports that ride on the next block request

    def holding(self) -> list[list[Any]]:
        with self._lock:
            return [[j, i] for j, i in sorted(self.held)]

    def run(self, job_id: str) -> int:
        """Run blocks (of ``job_id`` first) until none is left or a stop is asked; returns how many ran."""
        ran = 0
        ready = self._prepare(job_id, None)
        while ready is not None:
            if self.stop.is_set() or ready.job_id in self.lost:
                self._release(ready)
                break
            upcoming = self._pool.submit(self._prepare, ready.job_id, ready.block.index)
            self._execute(ready)
            ran += 1
            t0 = time.perf_counter()
            ready = upcoming.result()
            if ready is not None:
                ready.timings["wait_s"] = time.perf_counter() - t0  # a stall: the next block was not ready
        self._flush_reports()
        return ran

    # -- the prefetch side ----------------------------------------------------------------------------
    def _prepare(self, job_id: str | None, after: int | None) -> _Ready | None:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with self._lock:
            done, self._done = self._done, []
        try:
            ask = report(NextBlock, {"node": self.node_id, "job": job_id, "after": after, "done": done,
                                     "models": sorted(self.models), "have": sorted(self.contexts)})
            reply = protocol.parse_reply(NextBlockReply, self.side.request(ask, timeout=60,
                                                                           stop=self.stop.bounded(5.0)))
        except (Unreachable, protocol.Invalid) as e:
            log.warning("%s; %d block reports lost, those blocks will run again", e, len(done))
            return None
        finally:
            with self._lock:
                self.held.difference_update((d["job"], d["block"]) for d in done)
        timings["claim_s"] = time.perf_counter() - t0
        if not reply.ok or reply.block is None or reply.job is None:
            return None
        jid, b = reply.job, reply.block
        block = Block(b.index, tuple(map(tuple, b.core)), tuple(map(tuple, b.read)))
        with self._lock:
            self.held.add((jid, block.index))
        ready = _Ready(jid, block, None, timings=timings)
        try:
            raw = reply.context.model_dump(mode="json") if reply.context is not None else None
            ctx = self.contexts.get(jid) or self._context(jid, raw, timings)
            ready.ctx = ctx
            t0 = time.perf_counter()
            ready.region = np.asarray(ctx.source[block.read_slices()])
            timings["read_s"] = time.perf_counter() - t0
        except BadInput as e:
            ready.error, ready.permanent = str(e), True
        except Exception as e:  # a corrupt chunk, S3 hiccup: retried (elsewhere too) up to the job's limit
            ready.error = f"reading {block.read}: {type(e).__name__}: {e}"
        return ready

    def _context(self, job_id: str, raw: dict | None, timings: dict[str, float]) -> _Context:
        if raw is None:  # we said we had it, but dropped it since: the orchestrator sends it next time
            raise RuntimeError(f"no context for job {job_id} on this node")
        spec = JobSpec.model_validate(raw["spec"])
        self.store.check_source(spec.image)  # the context comes over the queue: untrusted like any spec
        self.store.check_source(raw["output"], "write")
        checkpoint = fetch_cached(self.store, self.cache, spec.model, timings)
        task = task_of(spec)
        split = raw.get("split")
        ctx = _Context(spec, task, raw["output"], (job_id, int(split) if split is not None else None),
                       task.calibration(raw), checkpoint, chunk_files(open_volume(spec.image)))
        from dlorch.core import omezarr

        pyramid = omezarr.load_pyramid(raw["output"])
        ctx.pyramid = omezarr.open_pyramid(pyramid) if pyramid is not None else None
        if len(self.contexts) >= 8:
            self.contexts.pop(next(iter(self.contexts)))
        self.contexts[job_id] = ctx
        self.models.add(spec.model)
        return ctx

    # -- the compute side ------------------------------------------------------------------------------
    def _execute(self, r: _Ready) -> None:
        t = r.timings
        if r.error is None:
            try:
                t0 = time.perf_counter()
                model = _model(r.ctx.checkpoint, r.ctx.task)
                t1 = time.perf_counter()
                values = _compute(r, model)
                t2 = time.perf_counter()
                check_block_output(r.ctx.output, r.ctx.owner)  # still the array this job's split created
                if r.ctx.pyramid is not None:  # OME-Zarr: every level of the block, and of the image copy
                    from dlorch.core.omezarr import write_block

                    image = r.region[r.block.crop()] if r.ctx.pyramid.with_image else None
                    write_block(r.ctx.pyramid, r.block.core, values, image)
                else:
                    if r.ctx.sink is None:
                        r.ctx.sink = chunk_files(open_volume(r.ctx.output, mode="r+"))
                    r.ctx.sink[r.block.core_slices()] = values
                t3 = time.perf_counter()
                t.update(model_load_s=t1 - t0, compute_s=t2 - t1, write_s=t3 - t2)
            except BadInput as e:
                r.error, r.permanent = str(e), True
            except Exception as e:
                log.exception("block %d of %s raised", r.block.index, r.job_id)
                r.error = f"{type(e).__name__}: {e}"
        t["report_s"], self._report_s = self._report_s, 0.0  # the previous report's cost, counted here
        t["total_s"] = sum(t.get(k, 0.0) for k in ("model_load_s", "compute_s", "write_s", "wait_s", "report_s"))
        body: dict[str, Any] = {"node": self.node_id, "job": r.job_id, "block": r.block.index, "timings": t}
        if r.error is None:  # told with the next block request (still leased, and renewed, until then)
            with self._lock:
                self._done.append(body)
            return
        log.warning("block %d of %s failed: %s", r.block.index, r.job_id, r.error)
        self._send(BlockFailed, {**body, "error": r.error, "permanent": r.permanent})
        with self._lock:
            self.held.discard((r.job_id, r.block.index))

    def _flush_reports(self) -> None:
        """Send the done reports no block request took: the last blocks before this node stops asking."""
        with self._lock:
            done, self._done = self._done, []
        for body in done:
            self._send(BlockDone, body)
            with self._lock:
                self.held.discard((body["job"], body["block"]))

    def _release(self, r: _Ready) -> None:
        self._flush_reports()
        self._send(BlockRelease, {"node": self.node_id, "job": r.job_id, "block": r.block.index})
        with self._lock:
            self.held.discard((r.job_id, r.block.index))

    def _send(self, model: type[BlockDone | BlockFailed | BlockRelease], body: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            self.main.tell(report(model, body))  # one-way: a lost report only means the block runs again
        except (Unreachable, protocol.Invalid) as e:
            log.warning("block report not sent (%s); it will run again after its lease", e)
        self._report_s += time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
