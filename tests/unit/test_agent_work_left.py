"""What `dlorch agent --handed-back-status` reports: work given back on a signal or spot notice, not on a drain,
and nothing when the agent held nothing (a batch script requeues itself only on the first)."""

from dlorch.core.settings import Settings
from dlorch.nodeagent.agent import DRAIN, Agent


def _agent(tmp_path) -> Agent:
    s = Settings(store=str(tmp_path), queue=f"sqlite:///{tmp_path / 'q.db'}", secret="k")
    return Agent(s, node_id="n1", workdir=tmp_path / "agent")


def test_an_idle_agent_stopped_by_a_signal_has_no_work_left(tmp_path):
    a = _agent(tmp_path)
    a.stop.set("signal SIGTERM")
    assert a.step() is False  # stopping: it takes nothing more
    assert not a.work_left()


def test_work_handed_back_on_a_signal_or_spot_notice_is_left_for_a_later_run(tmp_path):
    for reason in ("signal SIGTERM", "spot interruption notice {}"):
        a = _agent(tmp_path)
        a.handed_back = True  # what step() records when an attempt ends handed back, or blocks stay undone
        a.stop.set(reason)
        assert a.work_left()


def test_a_drained_agent_leaves_for_good(tmp_path):
    a = _agent(tmp_path)
    a.handed_back = True
    a.stop.set(DRAIN)
    assert not a.work_left()
