"""The engine's tasks behind one interface, so an attempt and its blocks run without caring which.

Segmentation pairs an image with sparse labels; denoising with nothing (Noise2Void), a second
noisy acquisition (Noise2Noise) or a clean target (CARE). A task plans, trains and predicts a whole
image; for blockwise prediction it loads a model, calibrates on a sample of the volume (what every
block shares, and this node's speed), says what a block must read, and computes a block.
The engine is imported inside the methods: an agent starts without torch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from dlorch.core.spec import JobSpec

Extent = tuple[tuple[int, int], ...]  # (start, stop) along each axis


class LoadedModel(NamedTuple):
    """A checkpoint's network and the plan it was trained with; unpacks as the engine's ``(net, plan)``."""

    network: Any  # torch.nn.Module, in eval mode on the CPU
    plan: Any  # SegmentationPlan or DenoisingPlan


@dataclass(frozen=True)
class BlockOutput:
    """What the blocks of a task write."""

    dtype: str  # of the output array
    bytes_per_voxel: int  # memory a voxel takes while its block computes: sizes the blocks
    attributes: dict[str, Any]  # the output array's task-specific attributes


class Task(ABC):
    """One engine task: plan, train and predict an image, and the steps of blockwise prediction."""

    aux_role: str | None = None  # the second input: "labels", "target" or None

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    # -- whole images ---------------------------------------------------------------------------------
    @abstractmethod
    def plan_model(self, raw: dict[str, Any]) -> Any:
        """A plan stored with the job (JSON) as the task's plan."""

    @abstractmethod
    def plan(self, image: np.ndarray, aux: np.ndarray | None, voxel_size: tuple[float, ...] | None = None) -> Any:
        """The training plan for this image (and its second input), as the spec asks; ``voxel_size``: the
        image file's physical (Z, Y, X) voxel size where it gives one (it decides 2D or 3D)."""

    @abstractmethod
    def train(self, image: np.ndarray, aux: np.ndarray | None, plan: Any, **kwargs: Any) -> Any:
        """Train by the plan (``workdir``, ``resume_from``, ``hooks`` go to the engine)."""

    @abstractmethod
    def predict(self, checkpoint: Path, image: np.ndarray) -> np.ndarray:
        """The output of a trained model for a whole image."""

    def predict_outputs(self, checkpoint: Path, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of a whole-image prediction by name: ``output``, and what the spec's options add."""
        return {"output": self.predict(checkpoint, image)}

    def fetch_extras(self, fetch: Callable[[str], Path], read: Callable[[str, str], np.ndarray]) -> None:
        """Fetch the inputs a training takes besides the image and its second input (``fetch``: a store
        URI to a local file; ``read``: a URI and its role to an array)."""

    # -- blockwise ------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, checkpoint: Path) -> LoadedModel:
        """A trained model, ready to predict blocks."""

    @abstractmethod
    def calibrate(self, sample: np.ndarray, model: LoadedModel) -> tuple[dict[str, Any], float]:
        """Measure on a sample of the volume what every block shares, and this node's voxels per second.

        Returns:
            (the shared values as JSON fields of the ``split`` report, voxels per second of one block).
        """

    @abstractmethod
    def calibration(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The shared values of ``calibrate``, as a block receives them (JSON), ready for ``compute``."""

    @abstractmethod
    def reach(self, plan: Any, shape: tuple[int, ...]) -> Callable[[Extent], Extent]:
        """What a block must read, given its core, to come out as in one whole pass over the volume."""

    @abstractmethod
    def block_output(self, plan: Any) -> BlockOutput:
        """What the blocks write."""

    @abstractmethod
    def compute(self, model: LoadedModel, region: np.ndarray, crop: tuple[slice, ...],
                calibration: dict[str, Any], *, volume_shape: tuple[int, ...], origin: tuple[int, ...]) -> np.ndarray:
        """A block's output core from its read ``region`` (at ``origin`` in the volume), cropped by ``crop``."""


class Segmentation(Task):
    """Sparse labels to a label image; blocks share the volume's intensity statistics and class priors."""

    aux_role = "labels"

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.accepted: np.ndarray | None = None  # options.accepted, read by fetch_extras
        self.init_from: Path | None = None  # options.init_from's checkpoint, fetched by fetch_extras

    def fetch_extras(self, fetch, read):
        opts = self.spec.options
        if opts.get("accepted"):
            self.accepted = read(opts["accepted"], "accepted labels")
        if opts.get("init_from"):
            self.init_from = fetch(opts["init_from"])

    def plan_model(self, raw):
        from dlorch.core.engine.segment import SegmentationPlan

        return SegmentationPlan.model_validate(raw)

    def plan(self, image, aux, voxel_size=None):
        from dlorch.core.engine.segment import plan_segmentation, read_model, warm_plan

        spec = self.spec
        if self.init_from is not None:  # the network is the model's; the variant, if any, made it
            source, _ = read_model(self.init_from, spec.options["init_from"])
            plan = warm_plan(image, aux, source, epochs=spec.epochs, time_budget=spec.time_budget,
                             shown=spec.options["init_from"])
        else:
            plan = plan_segmentation(image, aux, epochs=spec.epochs, time_budget=spec.time_budget,
                                     voxel_size=voxel_size)
            if spec.options.get("variant"):
                from dlorch.core.engine.segment import apply_variant

                plan = apply_variant(plan, spec.options["variant"])
        if self.init_from is not None:  # refused here, before training, if its weights do not fit
            from dlorch.core.engine.segment.warmstart import initial_weights

            initial_weights(self.init_from, plan, spec.options["init_from"])
        if self.accepted is not None:
            from dlorch.core.engine.inputs import check_accepted
            from dlorch.core.engine.segment.accepted import DEFAULT_ACCEPTED_WEIGHT

            check_accepted(aux, self.accepted, plan.num_classes)

            weight = float(spec.options.get("accepted_weight", DEFAULT_ACCEPTED_WEIGHT))
            plan = plan.model_copy(update={"accepted_weight": weight, "reasons": [
                *plan.reasons, f"accepted labels: {int((self.accepted > 0).sum())} pixels accepted from a prediction, "
                               f"each weighing {weight:g} of a painted one; painted labels win where both label a pixel"]})
        return plan

    def train(self, image, aux, plan, **kwargs):
        from dlorch.core.engine.segment import train_segmentation

        return train_segmentation(image, aux, plan, accepted=self.accepted, init_from=self.init_from, **kwargs)

    def predict(self, checkpoint, image):
        from dlorch.core.engine.segment import predict_segmentation

        return predict_segmentation(checkpoint, image, tta=self.spec.options.get("tta"))  # None: as the plan chose

    def predict_outputs(self, checkpoint, image):
        if not self.spec.options.get("confidence"):
            return super().predict_outputs(checkpoint, image)
        from dlorch.core.engine.segment import predict_with_confidence

        labels, confidence = predict_with_confidence(checkpoint, image, tta=self.spec.options.get("tta"))
        return {"output": labels, "confidence": confidence}

    def load(self, checkpoint):
        from dlorch.core.engine.segment import load_model

        return LoadedModel(*load_model(checkpoint))

    def calibrate(self, sample, model):
        """Predict a few sample slices: the volume's statistics and class priors, and the node's speed.

        The statistics and the priors (EM, priors.py) are measured once for the volume, so every
        block is normalised and corrected alike; per block they would make a block's labels depend on
        what else happens to lie in it, and on the block size. The throughput sizes the blocks.
        """
        from dlorch.core.engine.segment import intensity_stats
        from dlorch.core.engine.segment import predict_probabilities
        from dlorch.core.engine.segment import estimate_priors

        stats = intensity_stats(sample)
        few, warm = _timing_sample(sample, model.plan)
        predict_probabilities(None, warm, stats=stats, model=model, priors=None)  # warm-up
        t0 = time.perf_counter()
        probs = predict_probabilities(None, few, stats=stats, model=model, priors=None)
        voxels_per_s = few.size / max(time.perf_counter() - t0, 1e-6)
        priors = None
        if model.plan.train_prior:
            priors = [float(v) for v in estimate_priors(probs, np.asarray(model.plan.train_prior))]
        asked = self.spec.options.get("tta")
        if model.plan.tta if asked is None else asked:
            voxels_per_s /= 8  # the blocks average 8 flips/rotations; the timing ran one
        return {"norm": stats.model_dump(), "priors": priors}, voxels_per_s

    def calibration(self, fields):
        from dlorch.core.engine.segment import IntensityStats

        return {"priors": np.asarray(fields["priors"], dtype=float) if fields.get("priors") else None,
                "stats": IntensityStats.model_validate(fields["norm"]) if fields.get("norm") else None}

    def reach(self, plan, shape):
        from dlorch.core.engine.segment import prediction_grid

        return prediction_grid(plan, shape).read_region

    def block_output(self, plan):
        return BlockOutput("uint8", 3 * (4 + 12 * plan.num_classes), {"classes": plan.num_classes})

    def compute(self, model, region, crop, calibration, *, volume_shape, origin):
        from dlorch.core.engine.segment import labels_from_probabilities, predict_probabilities

        probs = predict_probabilities(None, region, stats=calibration["stats"], model=model,
                                      priors=calibration["priors"], tta=self.spec.options.get("tta"),
                                      volume_shape=volume_shape, origin=origin)
        return labels_from_probabilities(probs[(slice(None), *crop)])


class Denoising(Task):
    """A noisy image to a clean one (float32); blocks share the volume's noise level."""

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.aux_role = "target" if spec.target else None

    def plan_model(self, raw):
        from dlorch.core.engine.denoise import DenoisingPlan

        return DenoisingPlan.model_validate(raw)

    def plan(self, image, aux, voxel_size=None):
        from dlorch.core.engine.denoise import plan_denoising

        spec = self.spec
        return plan_denoising(image, aux, epochs=spec.epochs, time_budget=spec.time_budget, mode=spec.mode,
                              voxel_size=voxel_size)

    def train(self, image, aux, plan, **kwargs):
        from dlorch.core.engine.denoise import train_denoising

        return train_denoising(image, aux, plan, **kwargs)

    def predict(self, checkpoint, image):
        from dlorch.core.engine.denoise import predict_denoising

        return predict_denoising(checkpoint, image)

    def load(self, checkpoint):
        from dlorch.core.engine.denoise import load_denoiser

        return LoadedModel(*load_denoiser(checkpoint))

    def calibrate(self, sample, model):
        """Denoise the sample: the volume's noise level (for the posterior step) and the node's speed.

        Inputs are normalised by the training image's statistics, kept in the model; the noise level
        is estimated once for the volume, for the same reason as segmentation's priors.
        """
        from dlorch.core.engine.denoise import network_output, uses_posterior, volume_noise_var
        from dlorch.core.engine.inputs import as_stack

        plan, stack = model.plan, as_stack(sample)
        _, warm = _timing_sample(sample, plan)
        network_output(model, as_stack(warm))  # warm-up
        t0 = time.perf_counter()
        mu = network_output(model, stack)  # the whole sample: the noise level needs it, and it times the node
        voxels_per_s = stack.size / max(time.perf_counter() - t0, 1e-6)
        return {"noise_var": volume_noise_var(stack, mu, plan) if uses_posterior(plan) else None}, voxels_per_s

    def calibration(self, fields):
        return {"noise_var": fields.get("noise_var")}

    def reach(self, plan, shape):
        from dlorch.core.engine.denoise import region_for

        def read_region(core: Extent) -> Extent:
            return region_for(plan, shape, core)

        return read_region

    def block_output(self, plan):
        return BlockOutput("float32", 3 * (4 + 16), {})

    def compute(self, model, region, crop, calibration, *, volume_shape, origin):
        from dlorch.core.engine.denoise import denoise_with_details

        done = denoise_with_details(None, region, model=model, noise_var=calibration["noise_var"],
                                    volume_shape=volume_shape, origin=origin)
        return done.image[crop]


def task_of(spec: JobSpec) -> Task:
    """The engine task a spec names."""
    return Denoising(spec) if spec.task == "denoising" else Segmentation(spec)


def _timing_sample(sample: np.ndarray, plan: Any) -> tuple[np.ndarray, np.ndarray]:
    """A few slices to time (the slab whole for a 3D network), and a small warm-up piece of them."""
    if plan.spatial_dims == 3:  # the slab as it is: a 3D network needs its slices contiguous
        few = sample
    else:
        few = sample[np.unique(np.linspace(0, len(sample) - 1, min(4, len(sample))).astype(int))] \
            if sample.ndim == 3 else sample
    warm = few[:, : plan.infer_roi[-2], : plan.infer_roi[-1]] if plan.spatial_dims == 3 else \
        (few[:1] if few.ndim == 3 else few)
    return few, warm
