"""The segmentation network: MONAI's DynUNet shaped by the plan (widths, depth, normalisation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet


def build_unet(
    spatial_dims: int, in_channels: int, out_channels: int, filters: Sequence[int], norm: str = "batch"
) -> torch.nn.Module:
    """Build a U-Net with one 3x3 double-conv level per filter width and stride-2 downsampling.

    DynUNet (not BasicUNet) because its depth follows the plan: a tiny image gets fewer
    levels instead of a bottleneck of one pixel. Batch norm (not instance norm) makes the
    output of a pixel independent of the tile it is predicted in, so tiled prediction matches
    whole-image prediction.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of classes.
        filters: channel width of each level, shallow to deep.
        norm: MONAI norm name.

    Returns:
        The network (outputs raw logits).
    """
    levels = len(filters)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=list(filters),
        norm_name=norm,
        res_block=False,
    )
