"""Measure how long a training step takes on this machine, so a plan can fit a time budget.

A FLOP-count model would be pure but wrong by several times across CPUs (AVX2 vs AVX-512,
cores shared with other jobs); real steps of the planned network cost a second or two and tell
the truth. The number is recorded in the plan, which is why a plan should be made on the kind of
machine that trains. Each task builds its network and loss and reduces the timings its own way
(segmentation: the median of a few steps; denoising: the fastest of a short window).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from dlorch.core.engine.device import Runtime, apply_threads

# What a task hands the timer: its network, an input batch and the loss of the network's output,
# all on the given device.
StepSetup = Callable[[torch.device], tuple[torch.nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


def time_steps(
    runtime: Runtime,
    setup: StepSetup,
    *,
    min_steps: int,
    min_seconds: float = 0.0,
    max_steps: int = 40,
) -> tuple[list[float], list[float]]:
    """Time training steps and forward-only (validation) passes of a network, after one warm-up step.

    The network is built with torch's global generator seeded at 0, which is restored afterwards:
    planning must not change what training draws.

    Args:
        runtime: where to measure (its thread count is applied).
        setup: builds (network, input batch, loss of the output) on a device.
        min_steps: keep stepping until this many steps are timed ...
        min_seconds: ... and this many seconds measured ...
        max_steps: ... but stop at this many steps once ``min_steps`` are timed.

    Returns:
        (seconds of each timed training step, seconds of each timed forward-only pass).
    """
    apply_threads(runtime)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    device = runtime.device
    net, x, loss_of = setup(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    dtype = runtime.autocast_dtype

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_times: list[float] = []
    eval_times: list[float] = []
    i = 0
    while i <= min_steps or (sum(train_times) + sum(eval_times) < min_seconds and i <= max_steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(net(x))
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
        i += 1
    torch.random.set_rng_state(rng_state)
    return train_times, eval_times
