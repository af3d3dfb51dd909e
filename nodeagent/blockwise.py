"""Blockwise prediction on a node: plan a volume's blocks (the parent job), or run one block.

A block reads its core plus a halo from the input zarr, predicts, crops the halo and writes its
core into the output zarr. Blocks are whole zarr chunks, so concurrent writers never share a chunk,
and the same block always writes the same bytes: a block re-run after a kill is harmless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dlorch.core.blocks import plan_blocks
from dlorch.core.errors import BadInput
from dlorch.core.volumes import create_volume, open_volume

if TYPE_CHECKING:
    from dlorch.nodeagent.attempt import Attempt

# A block of ~4 Mvoxels takes seconds on a CPU core: long enough to amortise dispatch.
DEFAULT_BLOCK_VOXELS = 4 * 2**20
# Slices read to estimate the volume's intensity statistics (shared by every block).
STAT_SLICES = 16

_models: dict[str, Any] = {}  # loaded networks of this process, by local checkpoint path


def _model(path: Path):
    """Load a checkpoint's network once per process (blocks of one job share it)."""
    from dlorch.core.engine.predict import load_model

    key = str(path)
    if key not in _models:
        _models.clear()  # one model at a time keeps memory bounded
        _models[key] = load_model(path)
    return _models[key]


def split(attempt: "Attempt", checkpoint: Path) -> dict[str, Any]:
    """Plan the blocks of a volume, create the output array, and return the ``split`` report."""
    from dlorch.core.engine.intensity import intensity_stats

    job, spec = attempt.job, attempt.job.spec
    with attempt.timed("model_load_s"):
        _, plan = _model(checkpoint)
    with attempt.timed("plan_blocks_s"):
        vol = open_volume(spec.image)
        if vol.ndim not in (2, 3):
            raise BadInput(f"blockwise prediction takes a 2D or 3D volume; {spec.image} has shape {vol.shape}")
        # The network sees one slice at a time: context is needed in-plane only.
        halo = (0,) * (vol.ndim - 2) + tuple(r // 2 for r in plan.infer_roi)
        target = int(spec.options.get("block_voxels", DEFAULT_BLOCK_VOXELS))
        blocks = plan_blocks(tuple(vol.shape), tuple(vol.chunks), halo, target)
        picks = np.unique(np.linspace(0, vol.shape[0] - 1, min(STAT_SLICES, vol.shape[0])).astype(int))
        sample = np.stack([np.asarray(vol[int(z)]) for z in picks]) if vol.ndim == 3 else np.asarray(vol[...])
        stats = intensity_stats(sample)
        output = spec.output or attempt.store.uri(f"jobs/{job.id}/output.zarr")
        create_volume(output, tuple(vol.shape), tuple(vol.chunks), "uint8",
                      attributes={"dlorch_job": job.id, "model": spec.model, "classes": plan.num_classes})
    return {"outcome": "split", "output": output, "norm": stats.model_dump(), "voxels": math.prod(vol.shape),
            "blocks": [{"index": b.index, "core": b.core, "read": b.read} for b in blocks]}


def run_block(attempt: "Attempt", checkpoint: Path) -> dict[str, Any]:
    """Predict one block and write its core; returns the finish report."""
    from dlorch.core.blocks import Block
    from dlorch.core.engine.intensity import IntensityStats
    from dlorch.core.engine.predict import predict_probabilities

    spec = attempt.job.spec
    b = Block(spec.block["index"], tuple(map(tuple, spec.block["core"])), tuple(map(tuple, spec.block["read"])))
    with attempt.timed("read_s"):
        region = np.asarray(open_volume(spec.image)[b.read_slices()])
    with attempt.timed("model_load_s"):
        model = _model(checkpoint)
    with attempt.timed("compute_s"):
        stats = IntensityStats.model_validate(spec.block["norm"])
        probs = predict_probabilities(None, region, stats=stats, model=model)
        labels = (probs.argmax(0) + 1).astype(np.uint8)[b.crop()]
    with attempt.timed("write_s"):
        out = open_volume(spec.output, mode="r+")
        out[b.core_slices()] = labels
    return {"outcome": "succeeded", "metrics": {"voxels": b.voxels}}
