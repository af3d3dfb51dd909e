"""Measure how long a training step takes on this machine, so a plan can fit a time budget.

A FLOP-count model would be pure but wrong by several times across CPUs (AVX2 vs AVX-512,
cores shared with other jobs); real steps of the planned network cost a second or two and tell
the truth. The number is recorded in the plan, which is why a plan should be made on the kind of
machine that trains. Each task builds its network and loss and reduces the timings its own way
(segmentation: the fastest of a few steps; denoising: the fastest of a short window).

A measurement carries a few percent of noise on a shared machine, and far more under contention;
``settled_seconds`` keeps, per machine and network, the grid value a plan used last time unless a
new measurement is clearly faster (``schedule.settle_step_seconds``), so the same command plans the same epochs run after run.
The record lives in the user's cache directory: it describes the machine, not a dlorch home.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable

import torch

from dlorch.core.engine.device import Runtime, apply_threads
from dlorch.core.engine.schedule import settle_step_seconds

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


def memo_path() -> pathlib.Path:
    """Where this machine's settled step times are kept (``$XDG_CACHE_HOME/dlorch``, else ``~/.cache/dlorch``)."""
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "dlorch" / "step-seconds.json"


def settled_seconds(key: str, runtime: Runtime, step_s: float | None, eval_s: float | None,
                    path: pathlib.Path | None = None) -> tuple[float | None, float | None]:
    """Measured (step, forward-only) seconds settled against this machine's record for ``key``.

    Args:
        key: what was timed (the task and its network's shape); the runtime's device and thread
            count are added to it.
        runtime: where it was timed.
        step_s, eval_s: the measurement.
        path: the record (default ``memo_path()``); an unreadable record is ignored and rewritten.

    Returns:
        Grid values: the recorded ones unless the measurement is clearly faster, else the snapped measurement.
    """
    path = path or memo_path()
    key = f"{runtime.describe()}|threads={runtime.cpu_threads}|{key}"
    try:
        memo = json.loads(path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    before = memo.get(key) if isinstance(memo.get(key), list) and len(memo.get(key)) == 2 else [None, None]
    settled = [settle_step_seconds(step_s, _num(before[0])), settle_step_seconds(eval_s, _num(before[1]))]
    if settled != before:
        memo[key] = settled
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs the hysteresis, never the plan
    return settled[0], settled[1]


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None
