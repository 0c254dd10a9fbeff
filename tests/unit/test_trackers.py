"""Which tracker a client calls (cluster/trackers.py) when several callers fail at once."""

from __future__ import annotations

from cluster.errors import NotActive
from cluster.trackers import Trackers


def test_callers_failing_on_the_same_tracker_move_on_once() -> None:
    trackers = Trackers("a:1,b:2,c:3")
    # Eight parallel transfers all fail on a:1: the first moves on, the others find it moved.
    for _ in range(8):
        assert trackers.next("a:1") == "b:2"
    assert trackers.current == "b:2"
    assert trackers.next("b:2") == "c:3"
    assert trackers.next("c:3") == "a:1"


def test_answers_from_a_tracker_already_left_move_nothing() -> None:
    trackers = Trackers("a:1,b:2,c:3")
    hint_c = NotActive(NotActive.PREFIX + "c:3")
    # Two callers asked standby a:1 at once; both answers name c:3, the second finds it taken.
    assert trackers.follow("a:1", hint_c) == "c:3"
    assert trackers.follow("a:1", hint_c) == "c:3"
    # A third caller's late failure on a:1 must not send everyone on from c:3 to a:1.
    assert trackers.next("a:1") == "c:3"
    # A standby naming nobody sends its caller to the next one.
    assert trackers.follow("c:3", NotActive("not active")) == "a:1"
