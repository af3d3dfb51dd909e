"""Where the engine runs: accelerator choice, CPU threads, mixed precision and how freed memory is kept."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import platform
from dataclasses import dataclass, replace

import torch

from dlorch.core.malloc import keep_freed_memory
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

    def describe(self) -> str:
        """The device in a plan's words: accelerator, CPU threads and precision."""
        return f"device {self.accelerator} ({self.cpu_threads} CPU threads), precision {self.precision}"


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
    its cores multiply bf16 natively (``cpu_has_bf16``) and that measurably beats float32 there
    (``cpu_bf16_faster``), in float32 elsewhere.

    ``DLORCH_PRECISION`` overrides the choice (``settings.requested_precision``).
    """
    wanted = requested_precision()
    if torch.cuda.is_available():
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        memory = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        return Runtime("cuda", wanted or precision, usable_cpus(), memory)
    precision = wanted or ("bf16-mixed" if cpu_has_bf16() and cpu_bf16_faster() else "32-true")
    return Runtime("cpu", precision, usable_cpus(), ram_bytes())


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and torch's oneDNN uses it.

    There bf16 autocast can halve the bytes every convolution moves and run its products natively:
    measured on a 2-core AMD EPYC (Zen 4), a training step of the ISBI plan (8 x 256 x 256 at half
    resolution, two threads) 113 -> 85 ms and a 1024 x 1024 prediction window on one thread
    99 -> 63 ms, with the same IoU and PSNR. CPUs without those units only emulate bf16 in oneDNN, slower than float32, so
    they stay in float32. Having the units is not enough: see ``cpu_bf16_faster``.
    """
    flags = _cpuinfo()
    if not flags:  # not Linux: no way to tell cheaply, so the safe choice
        return False
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    try:
        return native and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _cpuinfo() -> str:
    """``/proc/cpuinfo`` once per process ("" where there is none)."""
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# bf16 must beat float32 by this factor in the probe to be chosen. The probe's ratio spread
# +-0.1 between runs on a shared VM; where bf16 pays it pays more (0.64-0.75 of float32's time on
# Zen 4), and where it does not the probe read 1.1-1.3.
BF16_MARGIN = 0.9


def bf16_pays(fp32_s: float, bf16_s: float, margin: float = BF16_MARGIN) -> bool:
    """Whether bf16 autocast is worth it, from the probe's seconds for the same work in each precision."""
    return fp32_s > 0 and bf16_s > 0 and bf16_s <= margin * fp32_s


def probe_bf16_seconds(repeats: int = 3) -> tuple[float, float]:
    """Seconds of a training step plus an inference pass of a small U-Net, in float32 and in bf16 autocast.

    The segmentation plan's own step timing (``segment.plan.measure_seconds``) on the 2D plan's network (widths
    16-192) with four 128 x 128 images, the size it trains at after its 2x pooling, on one thread:
    about two seconds in all. The caller's random stream and thread count are left as they were.
    """
    from dlorch.core.engine.segment.plan import measure_seconds

    cpu = Runtime("cpu", "32-true", 1)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # measure_seconds seeds; a seeded caller draws on unchanged
            fp32, bf16 = (sum(measure_seconds([16, 24, 48, 96, 192], [128, 128], 4, 2,
                                              replace(cpu, precision=p), repeats=repeats))
                          for p in ("32-true", "bf16-mixed"))
        return fp32, bf16
    finally:
        torch.set_num_threads(threads)


def precision_cache_path() -> pathlib.Path:
    """Where the probe's verdict is kept for this machine: ``$XDG_CACHE_HOME/dlorch`` or ``~/.cache/dlorch``,
    one file per CPU model and torch version (delete it to measure again)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")),
               platform.processor() or platform.machine())
    key = hashlib.sha256(f"{cpu}|{torch.__version__}".encode()).hexdigest()[:16]
    base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return base / "dlorch" / f"cpu-precision-{key}.json"


def measured_bf16_verdict(path: pathlib.Path, probe=probe_bf16_seconds) -> dict:
    """The machine's verdict on bf16, read from ``path`` or measured by ``probe`` and kept there.

    Kept so that every process on a machine computes in the same precision (agents predicting
    blocks of one volume side by side must agree to the bit) and the probe's two seconds are paid
    once per machine. The first process to write wins: one that measured too adopts the kept
    verdict. An unreadable or foreign file is measured over; an unwritable cache is measured per process.
    """
    kept = _read_verdict(path)
    if kept is not None:
        return kept
    fp32_s, bf16_s = probe()
    verdict = {"bf16": bf16_pays(fp32_s, bf16_s), "fp32_s": round(fp32_s, 5), "bf16_s": round(bf16_s, 5),
               "margin": BF16_MARGIN, "torch": torch.__version__}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(verdict))
        try:
            os.link(tmp, path)  # atomic, and fails where another process got there first
        except FileExistsError:
            theirs = _read_verdict(path)
            if theirs is not None:
                return theirs
            os.replace(tmp, path)  # an unreadable file: ours replaces it whole
        except OSError:  # a file system without hard links: last writer wins, still whole
            os.replace(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return verdict


def _read_verdict(path: pathlib.Path) -> dict | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and isinstance(kept.get("bf16"), bool) else None


@functools.cache
def cpu_bf16_faster() -> bool:
    """Whether bf16 autocast is measurably faster than float32 on this CPU (``measured_bf16_verdict``).

    The bf16 units alone do not decide it: on a 2-core Intel Xeon VM with AVX512-BF16 (and no AMX),
    bf16 made the ISBI plan's training step slower (0.278 -> 0.300 s, two threads) and its
    validation pass 33% slower, while on AMD Zen 4 the same flag made both 25-36% faster.
    """
    return bool(measured_bf16_verdict(precision_cache_path())["bf16"])


def apply_threads(runtime: Runtime) -> None:
    """Let torch use every usable core, but only on CPU: on a GPU node the cores feed the GPU.

    Every engine entry point calls this first, so it also sets up ``keep_freed_memory`` (once per process).
    """
    keep_freed_memory()
    if runtime.accelerator == "cpu":
        torch.set_num_threads(runtime.cpu_threads)


def thread_candidates(runtime: Runtime) -> list[int]:
    """CPU thread counts worth trying: all usable cores, and half of them.

    On a CPU shared with another busy process, OpenMP threads that outnumber the free cores
    spin against each other: on a 2-core machine next to one other training job, 1 thread ran
    a step 3-4x faster than 2. So both are measured and the faster one is used.
    """
    if runtime.accelerator != "cpu" or runtime.cpu_threads < 2:
        return [runtime.cpu_threads]
    return [runtime.cpu_threads, max(1, runtime.cpu_threads // 2)]
