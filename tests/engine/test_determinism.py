"""Same command, same answer: plans that do not follow timing noise, training that repeats bit for bit."""

import json

import numpy as np
import pytest
import torch

from dlorch.core.engine.calibrate import settled_seconds
from dlorch.core.engine.device import detect_runtime
from dlorch.core.engine.runcontrol import time_progress
from dlorch.core.engine.schedule import STEP_HYSTERESIS, plan_schedule, settle_step_seconds, snap_step_seconds
from dlorch.core.engine.segment import NoHooks, train_segmentation
from dlorch.core.engine.segment.plan import BUDGET_FILL, EPOCH_RULES

from .conftest import fast_plan


def _epochs(step_s: float, eval_s: float = 0.05) -> tuple[int, int]:
    s = plan_schedule(rules=EPOCH_RULES, accelerator="cpu", epoch_s=20, default_budget_s=330, wanted_steps=4000,
                      train_pixels=30 * 512 * 512, patch=[128, 128], batch=8, val_tiles=40,
                      step_seconds=step_s, eval_seconds=eval_s, epochs=None, time_budget=None)
    return s.epochs, s.steps_per_epoch


@pytest.mark.parametrize("measured", np.geomspace(0.03, 3.0, 61).tolist())
def test_timings_five_percent_apart_plan_the_same_epochs(measured, tmp_path):
    runtime = detect_runtime()
    memo = tmp_path / "step-seconds.json"
    first = settled_seconds("net", runtime, measured, measured / 3, path=memo)
    for later in (measured * 1.05, measured / 1.05):
        again = settled_seconds("net", runtime, later, later / 3, path=memo)
        assert again == first
        assert _epochs(*again) == _epochs(*first)
    # The record is keyed by what was timed: another network starts from its own measurement.
    other = settled_seconds("other net", runtime, measured * 2, measured, path=memo)
    assert other[0] == snap_step_seconds(measured * 2)


def test_a_real_change_of_speed_replans_and_a_bad_record_is_ignored(tmp_path):
    memo = tmp_path / "step-seconds.json"
    runtime = detect_runtime()
    slow = settled_seconds("net", runtime, 0.4, 0.1, path=memo)
    fast = settled_seconds("net", runtime, 0.4 / (STEP_HYSTERESIS * 1.1), 0.1, path=memo)
    assert fast[0] < slow[0] and _epochs(*fast) != _epochs(*slow)
    # A measurement under contention (40x slower) does not shrink the plan of an idle machine.
    assert settled_seconds("net", runtime, 40 * fast[0], 0.1, path=memo) == fast
    memo.write_text("{not json")
    assert settled_seconds("net", runtime, 0.4, 0.1, path=memo) == (snap_step_seconds(0.4), snap_step_seconds(0.1))
    assert json.loads(memo.read_text())  # rewritten whole


def test_grid_values_are_fixed_points_and_noise_inside_a_cell_is_absorbed():
    for k in range(-20, 10):
        g = 2.0 ** (k / 4)
        assert snap_step_seconds(g) == pytest.approx(g, rel=1e-12)
        assert settle_step_seconds(g * 1.02) == settle_step_seconds(g / 1.02) == snap_step_seconds(g)
        assert _epochs(g * 1.03) == _epochs(g / 1.03)
    assert settle_step_seconds(None) is None and settle_step_seconds(0.0) is None


def test_the_learning_rate_follows_steps_until_the_clock_runs_ahead_of_the_plan():
    # A run on schedule (BUDGET_FILL of the budget at its last step) never lets the clock lead.
    for share in np.linspace(0, 1, 21):
        assert time_progress(share * BUDGET_FILL * 330, 330) <= share + 1e-9
    assert time_progress(330, 330) == pytest.approx(1.0)
    assert time_progress(10, None) == 0.0


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_two_trainings_with_the_same_inputs_give_identical_weights(tiny_data, tmp_path):
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=1, steps=2)
    a = train_segmentation(image, labels, plan, workdir=tmp_path / "a", resume_from=None, hooks=NoHooks())
    b = train_segmentation(image, labels, plan, workdir=tmp_path / "b", resume_from=None, hooks=NoHooks())
    wa, wb = _weights(a.checkpoint), _weights(b.checkpoint)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The weights moved from their (seeded) start: the comparison is of trained weights.
    start = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    assert start["global_step"] == 2
