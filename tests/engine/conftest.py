"""Tiny synthetic segmentation data and a fast plan for the engine tests."""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest

from dlorch.core.engine.segment import Progress, SegmentationPlan, plan_segmentation

logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)


def make_scene(shape=(2, 64, 64), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright disks (class 2) on a dark noisy background (class 1): (image, painted strokes, truth)."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros(shape, np.float32)
    truth = np.ones(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    for k in range(z):
        for _ in range(3):
            cy, cx, r = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(6, 10)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            truth[k][disk] = 2
            labels[k, cy - 1 : cy + 2, cx - 2 : cx + 3] = 2  # a short stroke inside each disk
        image[k] = np.where(truth[k] == 2, 1.0, 0.0) + rng.normal(0, 0.3, (h, w))
        for i in range(4):  # background strokes along the top and bottom rows
            labels[k, 2:4, 4 + 14 * i : 10 + 14 * i] = 1
            labels[k, h - 4 : h - 2, 4 + 14 * i : 10 + 14 * i] = 1
        labels[k][(labels[k] == 1) & (truth[k] == 2)] = 0
    return image, labels, truth


def make_data(shape=(2, 64, 64), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(image, painted strokes) of ``make_scene``."""
    return make_scene(shape, seed)[:2]


@pytest.fixture(scope="session")
def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def fast_plan(image, labels, epochs: int, steps: int = 3, **update) -> SegmentationPlan:
    """The automatic plan shrunk to a few small steps per epoch so a test trains in seconds.

    Without test-time augmentation: it was costed for the plan before shrinking; tests that want it ask.
    """
    plan = plan_segmentation(image, labels, epochs=epochs)
    return plan.model_copy(update={"steps_per_epoch": steps, "batch_size": 4, "filters": [8, 16, 32], "tta": False,
                                   **update})


class RecordingHooks:
    """Counts batches (should_stop polls) and records checkpoints; can ask to stop after N of them."""

    def __init__(self, stop_after_checkpoints: int | None = None, raise_on_checkpoint: Exception | None = None):
        self.polls = 0
        self.checkpoints: list[tuple[pathlib.Path, Progress]] = []
        self.stop_after = stop_after_checkpoints
        self.raise_on_checkpoint = raise_on_checkpoint

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and len(self.checkpoints) >= self.stop_after

    def on_checkpoint(self, path: pathlib.Path, progress: Progress) -> None:
        assert path.exists() and path.stat().st_size > 0
        self.checkpoints.append((path, progress))
        if self.raise_on_checkpoint is not None:
            raise self.raise_on_checkpoint


class AbandoningHooks(RecordingHooks):
    """Raises ``error`` from ``should_stop`` at poll ``at``: the job runner learnt its lease is gone."""

    def __init__(self, error: Exception, at: int):
        super().__init__()
        self.error, self.at = error, at

    def should_stop(self) -> bool:
        super().should_stop()
        if self.polls >= self.at:
            raise self.error
        return False
