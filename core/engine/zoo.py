"""Candidate models for the same data: named variations of the automatic plan, one job each.

The bootstrapping wizard trains several candidates in parallel and lets the user pick. Each
variant changes one thing that matters on sparse strokes (depth and width, loss, context) so
that their segmentations differ in informative ways; everything else stays automatic.
"""

from __future__ import annotations

from typing import Callable

from dlorch.core.engine.plan import SegmentationPlan


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


VARIANTS: dict[str, Callable[[SegmentationPlan], SegmentationPlan]] = {
    "unet-deep": _deep,
    "unet-shallow-wide": _shallow_wide,
    "ce-only": _ce_only,
    "wide-context": _wide_context,
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
