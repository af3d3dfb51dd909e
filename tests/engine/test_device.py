"""Where the engine computes: the precision chosen per device and its override."""

import os
import subprocess
import sys

import pytest

from dlorch.core.engine.device import (bf16_pays, cpu_bf16_faster, cpu_has_bf16, detect_runtime,
                                       measured_bf16_verdict)
from dlorch.core.errors import BadInput


def test_the_cpu_computes_in_bf16_exactly_where_it_has_bf16_units_that_pay(monkeypatch):
    monkeypatch.delenv("DLORCH_PRECISION", raising=False)
    runtime = detect_runtime()
    if runtime.accelerator == "cpu":
        assert runtime.precision == ("bf16-mixed" if cpu_has_bf16() and cpu_bf16_faster() else "32-true")
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if not any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        assert not cpu_has_bf16()  # emulated bf16 is slower than float32: never chosen


def test_bf16_is_chosen_only_when_clearly_faster():
    assert bf16_pays(1.0, 0.7)  # Zen 4's ratio
    assert bf16_pays(1.0, 0.9)
    assert not bf16_pays(1.0, 0.95)  # within the probe's spread: float32 is the safer arithmetic
    assert not bf16_pays(0.278, 0.300)  # an Intel VM with AVX512-BF16 units that lose to float32
    assert not bf16_pays(0.0, 0.0) and not bf16_pays(1.0, 0.0)  # a timer that measured nothing


def test_the_verdict_is_measured_once_per_machine_and_shared(tmp_path):
    calls = []

    def probe(ratio):
        def run():
            calls.append(ratio)
            return 1.0, ratio
        return run

    path = tmp_path / "cache" / "dlorch" / "cpu-precision-x.json"
    first = measured_bf16_verdict(path, probe(0.7))
    assert first["bf16"] is True and first["fp32_s"] == 1.0 and first["bf16_s"] == 0.7
    # A second process reads it instead of measuring, even if it would have measured otherwise.
    assert measured_bf16_verdict(path, probe(1.2)) == first and calls == [0.7]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    # Another process writes its verdict while this one measures: this one adopts it.
    path.unlink()

    def racing():
        path.write_text('{"bf16": false, "fp32_s": 1.0, "bf16_s": 1.1}')
        return 1.0, 0.5

    assert measured_bf16_verdict(path, racing)["bf16"] is False
    assert measured_bf16_verdict(path, probe(0.5))["bf16"] is False

    # An unreadable or foreign file is measured over and replaced whole.
    for junk in ("{not json", '{"bf16": "yes"}', "[]"):
        path.write_text(junk)
        assert measured_bf16_verdict(path, probe(0.6))["bf16"] is True
        assert measured_bf16_verdict(path, probe(1.3))["bf16"] is True  # the replacement was kept

    # Nowhere to keep it (the cache's parent is a file): measured per process, no error.
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert measured_bf16_verdict(blocked / "dlorch" / "v.json", probe(1.3))["bf16"] is False


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


def test_the_probe_times_both_precisions_and_leaves_the_callers_random_stream_and_threads_alone():
    import torch

    from dlorch.core.engine.device import probe_bf16_seconds

    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fp32_s, bf16_s = probe_bf16_seconds(repeats=1)
    assert torch.equal(torch.rand(3), expected)  # a seeded training run after it draws what it would have
    assert torch.get_num_threads() == threads
    assert 0 < fp32_s < 30 and 0 < bf16_s < 30
