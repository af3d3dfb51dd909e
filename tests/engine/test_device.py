"""Where the engine computes: the precision chosen per device and its override."""

import os
import subprocess
import sys

import pytest

from dlorch.core.engine.device import cpu_has_bf16, detect_runtime
from dlorch.core.errors import BadInput


def test_the_cpu_computes_in_bf16_exactly_where_it_has_bf16_units(monkeypatch):
    monkeypatch.delenv("DLORCH_PRECISION", raising=False)
    runtime = detect_runtime()
    if runtime.accelerator == "cpu":
        assert runtime.precision == ("bf16-mixed" if cpu_has_bf16() else "32-true")
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if not any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        assert not cpu_has_bf16()  # emulated bf16 is slower than float32: never chosen


@pytest.mark.parametrize("value, precision", [("32", "32-true"), ("bf16", "bf16-mixed"), (" BF16 ", "bf16-mixed")])
def test_dlorch_precision_overrides_the_choice(monkeypatch, value, precision):
    monkeypatch.setenv("DLORCH_PRECISION", value)
    runtime = detect_runtime()
    assert runtime.precision == precision
    import torch

    assert runtime.autocast_dtype == (torch.bfloat16 if precision == "bf16-mixed" else None)


def test_an_unknown_precision_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("DLORCH_PRECISION", "fp8")
    with pytest.raises(BadInput, match="DLORCH_PRECISION='fp8' is not a precision; set it to 32 or bf16"):
        detect_runtime()
    done = subprocess.run([sys.executable, "-m", "dlorch.orchestrator.cli", "status"], capture_output=True,
                          text=True, env={**os.environ, "DLORCH_PRECISION": "fp8"}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: DLORCH_PRECISION='fp8' is not a precision; set it to 32 or bf16, or unset it to let each device choose"]
