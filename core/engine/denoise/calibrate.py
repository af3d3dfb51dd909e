"""Measure the seconds of one denoising training step on this machine, so the plan can fit a time budget.

Real steps rather than a FLOP model: the same network runs several times faster on one CPU
than on another (AVX2 vs AVX-512, cores shared with other jobs), and a few steps cost seconds.

The fastest of the steps run over a short window is taken, not the median of two or three:
on a machine shared with other jobs a burst of contention once made three steps 30x slower
than usual, and a plan built on that number used a quarter of its budget. Contention only
ever lengthens steps, and the time cap in training covers a machine slower than measured.
"""

from __future__ import annotations

import time

import torch

from dlorch.core.engine.denoise.blindspot import masked_mse
from dlorch.core.engine.device import Runtime, apply_threads
from dlorch.core.engine.network import build_unet, memory_format


def measure_step_seconds(
    filters: list[int],
    patch: list[int],
    batch: int,
    norm: str,
    runtime: Runtime,
    min_seconds: float = 2.0,
    min_steps: int = 3,
    max_steps: int = 40,
) -> tuple[float, float]:
    """Time a training step and a forward-only (validation) step of the planned network.

    Args:
        filters: DynUNet widths.
        patch: patch size, 2D (Y, X) or 3D (Z, Y, X).
        batch: batch size.
        norm: MONAI norm name.
        runtime: where to measure.
        min_seconds: keep stepping (after one warm-up step) until this much time is measured ...
        min_steps: ... and at least this many steps ...
        max_steps: ... but no more than this many.

    Returns:
        (seconds per training step, seconds per forward-only batch), the fastest of each.
    """
    apply_threads(runtime)
    # Restore the global RNG afterwards: planning must not change what training draws.
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    device = runtime.device
    layout = memory_format(len(patch) + 2)
    net = build_unet(len(patch), 1, 1, filters, norm).to(device).to(memory_format=layout)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *patch, device=device).contiguous(memory_format=layout)
    weight = (torch.rand(batch, 1, *patch, device=device) < 0.02).float()
    dtype = runtime.autocast_dtype

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    train_times, eval_times = [], []
    i = 0
    while i <= min_steps or (sum(train_times) + sum(eval_times) < min_seconds and i <= max_steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = masked_mse(net(x), x, weight)
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
    return min(train_times), min(eval_times)
