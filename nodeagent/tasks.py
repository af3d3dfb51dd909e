"""The engine's tasks behind one interface, so an attempt trains and predicts without caring which.

Segmentation pairs an image with sparse labels; denoising with nothing (Noise2Void), a second
noisy acquisition (Noise2Noise) or a clean target (CARE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dlorch.core.spec import JobSpec


@dataclass(frozen=True)
class Task:
    """plan / train / predict of one engine task, with the role of its second input."""

    aux_role: str | None  # "labels", "target" or None
    plan_model: Callable[[dict[str, Any]], Any]
    plan: Callable[..., Any]
    train: Callable[..., Any]
    predict: Callable[[Path, np.ndarray], np.ndarray]


def task_of(spec: JobSpec) -> Task:
    """The engine task a spec names."""
    if spec.task == "denoising":
        from dlorch.core.engine import denoise as e

        def plan(image, aux, spec=spec):
            return e.plan_denoising(image, aux, epochs=spec.epochs, time_budget=spec.time_budget, mode=spec.mode)

        return Task("target" if spec.target else None, e.DenoisingPlan.model_validate, plan,
                    e.train_denoising, e.predict_denoising)
    from dlorch.core.engine import segment as s

    def plan_seg(image, aux, spec=spec):
        plan = s.plan_segmentation(image, aux, epochs=spec.epochs, time_budget=spec.time_budget)
        if spec.options.get("variant"):
            from dlorch.core.engine.zoo import apply_variant

            plan = apply_variant(plan, spec.options["variant"])
        return plan

    def predict_seg(checkpoint, image, spec=spec):
        return s.predict_segmentation(checkpoint, image, tta=spec.options.get("tta"))  # None: as the plan chose

    return Task("labels", s.SegmentationPlan.model_validate, plan_seg, s.train_segmentation, predict_seg)
