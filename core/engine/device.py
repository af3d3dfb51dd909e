"""Where the engine runs: accelerator choice, CPU threads, mixed precision and how freed memory is kept."""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import platform
from dataclasses import dataclass

import torch

from dlorch.core.settings import requested_precision


@dataclass(frozen=True)
class Runtime:
    """The device the engine computes on and how."""

    accelerator: str  # "cuda" or "cpu" (Lightning's accelerator names)
    precision: str  # Lightning precision flag
    cpu_threads: int  # threads torch may use; only applied on CPU
    memory_bytes: int = 0  # memory of the device that holds the activations (GPU memory or RAM); 0 = unknown

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Dtype for inference autocast, None for full precision."""
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)


def usable_cpus() -> int:
    """CPU cores this process may run on (respects affinity masks and cgroup pinning).

    ``DLORCH_THREADS`` (``dlorch agent --threads N``) caps it, e.g. for several agents sharing a machine.
    """
    if os.environ.get("DLORCH_THREADS", "").isdigit():
        return max(1, int(os.environ["DLORCH_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def ram_bytes() -> int:
    """Physical memory of this machine (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def detect_runtime() -> Runtime:
    """Pick CUDA with bf16 (or fp16) autocast when available, else the CPU: with bf16 autocast where
    its cores multiply bf16 natively (``cpu_has_bf16``), in float32 elsewhere.

    ``DLORCH_PRECISION`` overrides the choice (``settings.requested_precision``).
    """
    wanted = requested_precision()
    if torch.cuda.is_available():
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        memory = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        return Runtime("cuda", wanted or precision, usable_cpus(), memory)
    precision = "bf16-mixed" if cpu_has_bf16() else "32-true"
    return Runtime("cpu", wanted or precision, usable_cpus(), ram_bytes())


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and torch's oneDNN uses it.

    There bf16 autocast halves the bytes every convolution moves and runs its products natively:
    measured on a 2-core AMD EPYC (Zen 4), a training step of the ISBI plan (8 x 256 x 256 at half
    resolution, two threads) 113 -> 85 ms and a 1024 x 1024 prediction window on one thread
    99 -> 63 ms, with the same IoU and PSNR. CPUs without those units only emulate bf16 in oneDNN, slower than float32, so
    they stay in float32.
    """
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, so the safe choice
        return False
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    try:
        return native and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def apply_threads(runtime: Runtime) -> None:
    """Let torch use every usable core, but only on CPU: on a GPU node the cores feed the GPU.

    Every engine entry point calls this first, so it also sets up ``keep_freed_memory`` (once per process).
    """
    keep_freed_memory()
    if runtime.accelerator == "cpu":
        torch.set_num_threads(runtime.cpu_threads)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 1 GiB for reuse instead of handing each back to the OS.

    Prediction allocates the same large activations for every window. glibc serves blocks over its
    mmap threshold (at most 32 MiB) with fresh mappings and unmaps them on free, so every window
    faulted its memory in and zeroed it again: 30,000 page faults and 50 ms of kernel time per
    1024x1024 slice, a fifth of its 0.27 s on one CPU thread. Kept in the heap, they are reused:
    0.22 s, with the same peak memory (640 MB). Once per process; False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def thread_candidates(runtime: Runtime) -> list[int]:
    """CPU thread counts worth trying: all usable cores, and half of them.

    On a CPU shared with another busy process, OpenMP threads that outnumber the free cores
    spin against each other: on a 2-core machine next to one other training job, 1 thread ran
    a step 3-4x faster than 2. So both are measured and the faster one is used.
    """
    if runtime.accelerator != "cpu" or runtime.cpu_threads < 2:
        return [runtime.cpu_threads]
    return [runtime.cpu_threads, max(1, runtime.cpu_threads // 2)]
