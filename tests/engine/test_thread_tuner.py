"""The thread-count tuner: a full probe at the start and every PROBE_EVERY epochs, and at once on a slowdown."""

from dlorch.core.engine import threads
from dlorch.core.engine.threads import PROBE_EVERY, PROBE_STEPS, SKIP_STEPS, ThreadTuner


class Clock:
    """A fake clock whose steps last what ``cost(threads)`` says."""

    def __init__(self, cost):
        self.t, self.cost = 0.0, cost

    def __call__(self):
        return self.t


class Module:
    def __init__(self):
        self.epoch_metrics = {}


def run_epoch(tuner, clock, steps=10, module=None):
    """One epoch of ``steps`` batches; returns the thread count of each batch."""
    module = module or Module()
    used = []
    tuner.on_train_epoch_start(None, module)
    for i in range(steps):
        tuner.on_train_batch_start(None, module, None, i)
        n = threads.torch.get_num_threads()
        used.append(n)
        clock.t += clock.cost(n)
        tuner.on_train_batch_end(None, module, None, None, i)
    return used


def test_probes_all_counts_first_then_only_every_few_epochs(monkeypatch):
    state = {"n": 2}
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: state.update(n=n))
    clock = Clock(lambda n: {2: 0.10, 1: 0.18}[n])
    tuner = ThreadTuner([2, 1], clock=clock)
    first = run_epoch(tuner, clock)
    assert first[:SKIP_STEPS] == [2] * SKIP_STEPS  # the epoch's first steps are not probed
    assert first[SKIP_STEPS:SKIP_STEPS + 2 * PROBE_STEPS].count(1) == PROBE_STEPS
    assert tuner.choice == 2 and tuner.probes == 1
    for _ in range(PROBE_EVERY - 1):  # quiet epochs: the slower count is never run
        assert 1 not in run_epoch(tuner, clock)
    assert tuner.probes == 1
    assert 1 in run_epoch(tuner, clock) and tuner.probes == 2  # the periodic probe


def test_a_slowdown_of_the_chosen_count_probes_again_in_the_same_epoch(monkeypatch):
    state = {"n": 2}
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: state.update(n=n))
    costs = {2: 0.10, 1: 0.18}
    clock = Clock(lambda n: costs[n])
    tuner = ThreadTuner([2, 1], clock=clock)
    run_epoch(tuner, clock)
    run_epoch(tuner, clock)
    costs[2] = 0.40  # another job came onto the cores: two threads now spin against it
    module = Module()
    used = run_epoch(tuner, clock, module=module)
    assert used[SKIP_STEPS + PROBE_STEPS:SKIP_STEPS + 2 * PROBE_STEPS] == [1] * PROBE_STEPS  # probed right after the slow steps
    assert tuner.choice == 1 and used[-1] == 1 and module.epoch_metrics["cpu_threads"] == 1.0


def test_a_slow_start_of_the_epoch_and_a_near_tie_keep_all_cores(monkeypatch):
    state = {"n": 2}
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: state.update(n=n))
    step = {"i": 0}

    def cost(n):  # the run's first steps are slow (warm-up, a checkpoint being written beside them)
        step["i"] += 1
        return 1.0 if step["i"] <= SKIP_STEPS else {2: 0.10, 1: 0.18}[n]

    clock = Clock(cost)
    tuner = ThreadTuner([2, 1], clock=clock)
    run_epoch(tuner, clock)
    assert tuner.choice == 2
    # One thread a little faster than two (within the noise of two probe steps) does not take over.
    clock.cost = lambda n: {2: 0.10, 1: 0.095}[n]
    for _ in range(PROBE_EVERY):
        run_epoch(tuner, clock)
    assert tuner.probes == 2 and tuner.choice == 2
    # Clearly faster (another job on the cores) does.
    clock.cost = lambda n: {2: 0.30, 1: 0.18}[n]
    run_epoch(tuner, clock)
    assert tuner.choice == 1
