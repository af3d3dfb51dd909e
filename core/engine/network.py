"""The network of both tasks: MONAI's DynUNet shaped by a plan (widths, depth, input scale); its inference form."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from monai.networks.nets import DynUNet


def memory_format(ndim: int) -> torch.memory_format:
    """Channels-last layout for a batch tensor of ``ndim`` axes (4: 2D images, 5: volumes)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def placed(net: torch.nn.Module, device: torch.device, layout: torch.memory_format) -> torch.nn.Module:
    """``net`` on ``device`` in ``layout``, moved once: a node predicting many small blocks with one
    model would otherwise walk every parameter on every call (3.5 ms of a 6.6 ms 16x16 block)."""
    if getattr(net, "_dlorch_placed", None) != (str(device), str(layout)):
        net = net.to(device).to(memory_format=layout)
        net._dlorch_placed = (str(device), str(layout))
    return net


class Rescaled(torch.nn.Module):
    """Runs a network on a 2x average-pooled image and upsamples its logits back.

    Used when the plan judges the structures big enough to be seen at half resolution: every
    step then costs about a quarter, which on a CPU buys four times the training.
    """

    def __init__(self, net: torch.nn.Module, scale: int) -> None:
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        logits = self.net(F.avg_pool2d(x, self.scale, ceil_mode=True))
        # Upsampled in the plain layout: PyTorch's CPU bilinear kernel for channels-last with a few
        # channels is 3x slower (2 x 512 x 512 -> 1024 x 1024: 10.4 ms against 3.1, one thread),
        # and the softmax after it runs at half speed on channels-last too.
        return F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=False)


def choose_filters(patch: list[int], default_filters: list[int]) -> list[int]:
    """Keep as many levels as leave a bottleneck of at least 8 pixels (and at least 3 levels: DynUNet's minimum)."""
    downsamplings = max(2, int(math.floor(math.log2(min(patch) / 8))))
    return list(default_filters[: min(len(default_filters), downsamplings + 1)])


def build_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    filters: Sequence[int],
    norm: str = "batch",
    input_scale: int = 1,
) -> torch.nn.Module:
    """Build a U-Net with one 3x3 double-conv level per filter width and stride-2 downsampling.

    DynUNet (not BasicUNet) because its depth follows the plan: a tiny image gets fewer
    levels instead of a bottleneck of one pixel. Batch norm (not instance norm) makes the
    output of a pixel independent of the tile it is predicted in, so tiled prediction matches
    whole-image prediction.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: output channels (segmentation: classes; denoising: 1).
        filters: channel width of each level, shallow to deep.
        norm: MONAI norm name.
        input_scale: 1, or 2 to run the network at half resolution (2D only).

    Returns:
        The network (outputs raw logits at the input resolution).
    """
    levels = len(filters)
    net = DynUNet(
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
    return Rescaled(net, input_scale) if input_scale > 1 else net


def fold_batch_norm(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` for inference: every batch norm folded into the convolution that feeds it.

    In eval mode a batch norm is a per-channel scale and shift, so ``norm(conv(x))`` is one
    convolution with scaled weights and a bias. Folded, prediction skips a read and a write of
    every activation map: a 1024x1024 ISBI slice on one CPU thread 0.173-0.180 s instead of
    0.186-0.193 s (fastest of 25), which on a 2-core machine shared by two agents is also less
    memory traffic to contend for. Returns a folded copy in eval mode; ``net`` is left as it was
    (a training module keeps its norms). Only MONAI's DynUNet blocks are folded, where each norm
    follows exactly one convolution; a module with other norms keeps them.
    """
    net = copy.deepcopy(net).eval()
    for block in net.modules():
        if isinstance(block, (UnetBasicBlock, UnetResBlock)):
            pairs = [("conv1", "norm1"), ("conv2", "norm2")]
            if getattr(block, "downsample", False):
                pairs.append(("conv3", "norm3"))
            for conv_name, norm_name in pairs:
                norm = getattr(block, norm_name)
                if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
                    _fold_into(getattr(block, conv_name).conv, norm)
                    setattr(block, norm_name, torch.nn.Identity())
    return net


@torch.no_grad()
def _fold_into(conv: torch.nn.modules.conv._ConvNd, norm: torch.nn.modules.batchnorm._BatchNorm) -> None:
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale + (norm.bias.double() if norm.affine else 0.0)
    bias = conv.bias.double() * scale if conv.bias is not None else 0.0
    shape = (-1,) + (1,) * (conv.weight.ndim - 1)
    conv.weight.copy_((conv.weight.double() * scale.reshape(shape)).to(conv.weight.dtype))
    conv.bias = torch.nn.Parameter((shift + bias).to(conv.weight.dtype), requires_grad=False)
