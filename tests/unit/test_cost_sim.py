"""bench/cost_sim.py's interface: the table it prints and the JSON it writes (the simulation itself is checked
against the cap in tests/unit/test_fleet_policy.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
KEYS = {"cost_usd", "cap_violations", "idle_share", "boot_share", "stop_share", "no_lease_share", "wait_mean_s",
        "wait_p95_s"}


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("cost_sim", BENCH / "cost_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_sim"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_json_maps_each_policy_to_its_figures_and_the_table_lists_them(sim, tmp_path, capsys):
    path = tmp_path / "out" / "cost.json"
    out = sim.main(["--days", "2", "--seed", "7", "--json", str(path)])
    data = json.loads(path.read_text())
    assert set(data) == {"dlorch", "clairvoyant", "always_on", "idle_timeout", "_meta"}
    assert data["_meta"]["days"] == 2 and data["_meta"]["seed"] == 7
    for name in ("dlorch", "clairvoyant", "always_on", "idle_timeout"):
        figures = data[name]
        assert KEYS <= set(figures) and figures == out[name]
        # where the paid node-seconds went: idle (could work, had none), booting, stopping, under no lease
        assert figures["no_lease_share"] == pytest.approx(
            figures["idle_share"] + figures["boot_share"] + figures["stop_share"], abs=3e-4)
        assert 0 <= figures["idle_share"] <= figures["no_lease_share"] <= 1
        assert figures["wait_p95_s"] >= 0 and figures["cost_usd"] > 0
    assert data["always_on"]["idle_share"] > 0.5 > data["dlorch"]["idle_share"]  # 8 machines all day for a few bursts
    table = capsys.readouterr().out
    assert all(name in table for name in ("dlorch", "clairvoyant", "always_on", "idle_timeout"))
    assert "idle" in table and "boot" in table and "wait p95" in table


def test_the_same_seed_gives_the_same_figures(sim):
    a = sim.main(["--days", "1", "--seed", "3", "--policies", "dlorch"])
    b = sim.main(["--days", "1", "--seed", "3", "--policies", "dlorch"])
    a["dlorch"].pop("sim_seconds"), b["dlorch"].pop("sim_seconds")
    assert a == b
