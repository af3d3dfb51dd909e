"""A stop ends every wait of an agent within a grace; an agent whose parent is gone stops."""

from __future__ import annotations

import os
import time

from dlorch.nodeagent.interrupts import PARENT_GONE, StopFlag, stop_with_parent


def test_a_wait_runs_its_course_until_a_stop_then_ends_a_grace_later():
    flag = StopFlag()
    bound = flag.bounded(0.2)
    time.sleep(0.3)
    assert not bound.is_set()  # no stop asked: the wait's own timeout rules
    flag.set("signal SIGTERM")
    assert not bound.is_set()  # the hand-back in flight gets its moment
    time.sleep(0.25)
    assert bound.is_set()


def test_a_wait_begun_while_stopping_gets_the_grace_from_its_start():
    flag = StopFlag()
    flag.set("drain requested")
    time.sleep(0.3)
    bound = flag.bounded(0.2)  # e.g. the finish report after the last epoch: sent, and heard if it is soon
    assert not bound.is_set()
    time.sleep(0.25)
    assert bound.is_set()


def test_an_agent_whose_parent_is_already_gone_stops_at_once():
    flag = StopFlag()
    stop_with_parent(flag, parent_pid=os.getppid() + 1)  # not our parent (any more)
    assert flag.is_set() and flag.reason == PARENT_GONE
