"""The orchestrator load benchmark runs its rows one after another on S3 (moto), each on a ledger of its own.

moto keeps its objects per process, not per server: a second row once found the first row's ledger (its
blockwise job already split), and its planner's claim was refused in setup.
"""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_s3_rows_in_one_invocation_each_start_from_an_empty_ledger(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # importable by name: its agents are spawned processes
    bench = importlib.import_module("orchestrator_load")
    monkeypatch.setattr(bench, "BLOCKS", 2_000)
    rows = [bench.run_once(2, "s3", 4.0) for _ in range(2)]  # a heartbeat every 3 s
    for row in rows:
        assert (row["false_expiries"], row["claims_refused"], row["heartbeat_errors"]) == (0, 0, 0)
        assert row["noop_blocks_per_s"] > 0 and row["heartbeats"] > 0
