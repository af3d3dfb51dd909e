"""Candidate models for the same data: named variations of the automatic plan, one job each.

The bootstrapping wizard trains several candidates in parallel and lets the user pick. Each
variant changes one thing that matters on sparse strokes (depth and width, loss, context,
2D or 3D) so that their segmentations differ in informative ways; everything else stays automatic.
"""

from __future__ import annotations

from typing import Callable

from dlorch.core.engine.anisotropy import MIN_SLICES_3D
from dlorch.core.engine.network import choose_filters
from dlorch.core.engine.segment.augment import AugmentConfig
from dlorch.core.engine.segment.geometry import (DEFAULTS, Geometry, choose_geometry, choose_patch, default_batch,
                                                 infer_window)
from dlorch.core.engine.segment.plan import SegmentationPlan


def _deep(plan: SegmentationPlan) -> SegmentationPlan:
    return plan  # the automatic plan itself: the deepest network the patch allows


def _shallow_wide(plan: SegmentationPlan) -> SegmentationPlan:
    # Three levels, twice as wide: more local detail, less context; sharper on thin membranes.
    widths = [w * 2 for w in plan.filters[:3]]
    return plan.model_copy(update={"filters": widths,
                                   "reasons": [*plan.reasons, f"variant shallow-wide: widths {widths}"]})


def _ce_only(plan: SegmentationPlan) -> SegmentationPlan:
    # Cross-entropy alone: no Dice term pulling small classes up; calibrated probabilities.
    return plan.model_copy(update={"dice_weight": 0.0,
                                   "reasons": [*plan.reasons, "variant ce-only: loss = cross-entropy"]})


def _wide_context(plan: SegmentationPlan) -> SegmentationPlan:
    # Patches twice as large (same pixels per batch): more context per sample, fewer samples.
    size = min(plan.image_shape[-1], plan.image_shape[-2])
    patch = [min(p * 2, size - size % 16 or 16) for p in plan.patch_size]
    batch = max(1, plan.batch_size // 4)
    return plan.model_copy(update={"patch_size": patch, "batch_size": batch,
                                   "reasons": [*plan.reasons, f"variant wide-context: patch {patch}, batch {batch}"]})


def _other_geometry(plan: SegmentationPlan) -> SegmentationPlan:
    # The geometry the automatic plan did not choose: a 3D U-Net for a stack segmented in 2D
    # (context across slices, useful when the measured anisotropy was borderline), a 2D one
    # slice by slice for a volume planned in 3D, and for a thin stack the other input scale
    # (full resolution for a half-resolution plan and back).
    d = DEFAULTS[plan.planned_on]
    z, y, x = plan.image_shape
    if plan.spatial_dims == 2 and z >= MIN_SLICES_3D:
        geometry, what = choose_geometry((y, x), plan.planned_on, 0.0, depth=z, aniso=1.0), "3D U-Net"
    elif plan.spatial_dims == 3:  # no stroke survival: full resolution
        geometry, what = choose_geometry((y, x), plan.planned_on, 0.0), "2D U-Net, slice by slice"
    else:
        scale = 1 if plan.input_scale == 2 else 2
        patch = choose_patch((y, x), d.patch * scale, multiple=16 * scale)
        geometry = Geometry(input_scale=scale, patch=patch, filters=choose_filters([p // scale for p in patch], d.filters),
                            reasons=[])
        what = "2D U-Net at full resolution" if scale == 1 else "2D U-Net at half resolution"
    dims, scale, patch, filters = geometry.spatial_dims, geometry.input_scale, geometry.patch, geometry.filters
    batch = default_batch(geometry, plan.planned_on)
    roi = infer_window((z, y, x)[-dims:], plan.planned_on)
    return plan.model_copy(update={
        "spatial_dims": dims, "input_scale": scale, "patch_size": patch, "filters": filters, "batch_size": batch,
        "infer_roi": roi, "augment": AugmentConfig(rot90=patch[-1] == patch[-2]),
        # Test-time augmentation was costed for the plan's geometry: kept only where this one is no dearer.
        "tta": plan.tta and dims == 2 and scale >= plan.input_scale,
        "reasons": [*plan.reasons, f"variant other-geometry: {what}, patch {patch}, widths {filters}, batch {batch}"],
    })


VARIANTS: dict[str, Callable[[SegmentationPlan], SegmentationPlan]] = {
    "unet-deep": _deep,
    "unet-shallow-wide": _shallow_wide,
    "ce-only": _ce_only,
    "wide-context": _wide_context,
    "other-geometry": _other_geometry,
}


def candidate_names(n: int) -> list[str]:
    """The first ``n`` variants; more than there are is an error naming the limit."""
    if not 1 <= n <= len(VARIANTS):
        raise ValueError(f"--candidates takes 1 to {len(VARIANTS)}; there are {len(VARIANTS)} variants")
    return list(VARIANTS)[:n]


def apply_variant(plan: SegmentationPlan, name: str) -> SegmentationPlan:
    """The plan of a named candidate."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name](plan)
