"""Measure how long one training step takes on this machine, so the plan can fit a time budget.

A FLOP-count model would be pure but wrong by several times across CPUs (AVX-only vs
AVX-512, shared cores); three real steps of the planned network cost about a second on a
CPU and tell the truth. The number is recorded in the plan, which is why a plan should be
made on the kind of machine that trains.
"""

from __future__ import annotations

import statistics
import time

import torch

from dlorch.core.engine.device import Runtime, apply_threads
from dlorch.core.engine.segment.losses import sparse_ce_dice_loss
from dlorch.core.engine.network import build_unet


def measure_seconds(
    filters: list[int],
    patch: list[int],
    batch: int,
    num_classes: int,
    runtime: Runtime,
    repeats: int = 2,
    input_scale: int = 1,
) -> tuple[float, float]:
    """Time a training step and a forward-only (validation) step of the planned network.

    Args:
        filters: network widths.
        patch: patch size, 2D (Y, X) or 3D (Z, Y, X).
        batch: batch size.
        num_classes: output channels.
        runtime: where to measure.
        repeats: timed steps after one warm-up step.
        input_scale: the plan's input scale.

    Returns:
        (seconds per training step, seconds per forward-only batch), medians.
    """
    apply_threads(runtime)
    torch.manual_seed(0)
    device = runtime.device
    net = build_unet(len(patch), 1, num_classes, filters, input_scale=input_scale).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=device)
    y = torch.randint(0, num_classes + 1, (batch, 1, *patch), device=device)
    dtype = runtime.autocast_dtype

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_times, eval_times = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sparse_ce_dice_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            net.eval()
            net(x)
            net.train()
        sync()
        t2 = time.perf_counter()
        if i > 0:
            train_times.append(t1 - t0)
            eval_times.append(t2 - t1)
    return statistics.median(train_times), statistics.median(eval_times)
