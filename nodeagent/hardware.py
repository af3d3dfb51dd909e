"""What a node has: CPUs, memory, GPUs and their memory, the torch version (portable, no extra deps)."""

from __future__ import annotations

import ctypes
import os
import platform
import socket
from typing import Any


def total_memory_bytes() -> int:
    """Physical memory, on Linux, macOS and Windows."""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if os.name == "nt":

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        st = MemoryStatus()
        st.dwLength = ctypes.sizeof(MemoryStatus)
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st))  # type: ignore[attr-defined]
        return int(st.ullTotalPhys)
    return 0


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpus() -> list[dict[str, Any]]:
    """CUDA devices with name and memory; empty without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                    "capability": f"{p.major}.{p.minor}"})
    return out


def torch_version() -> str:
    """The installed torch version, or empty."""
    try:
        import torch

        return torch.__version__
    except ImportError:
        return ""


def precision() -> str:
    """The precision this node's engine computes in (``engine.device.detect_runtime``), or empty.

    Shown by ``dlorch nodes``: in a fleet of mixed hardware, nodes with bf16 units (GPUs, CPUs with
    AVX512-BF16 or AMX) compute in bf16 and the others in float32, so their blocks of one volume
    differ by that rounding; ``DLORCH_PRECISION=32`` on every node keeps them to float32's.
    """
    try:
        from dlorch.core.engine.device import detect_runtime

        return detect_runtime().precision
    except Exception:  # no torch, or a bad DLORCH_PRECISION (the CLI refused it before this runs)
        return ""


def describe(node_id: str) -> dict[str, Any]:
    """The node's registration record (see ``spec.NodeInfo``)."""
    return {"id": node_id, "hostname": socket.gethostname(), "pid": os.getpid(), "cpus": cpu_count(),
            "memory_bytes": total_memory_bytes(), "gpus": gpus(), "torch": torch_version(),
            "precision": precision(),
            "platform": f"{platform.system()} {platform.machine()} py{platform.python_version()}"}
