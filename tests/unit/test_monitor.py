"""TRON's detection core, driven by tick(now) with a fake clock: no thread, no sleep."""

import threading

import pytest

from tron.common.models import Reason
from tron.common.clock import FakeClock
from tron.common.monitor import DeadlineQueue, Monitor, MonitorThread, Verdict


def watch(m, clock, name="a", inc="i1", beat=3.0, progress=10.0, task=100.0, start_grace=None):
    last = clock.now() if start_grace is None else clock.now() + start_grace - beat
    m.watch(name, inc, last, beat_timeout=beat, progress_timeout=progress, task_timeout=task)


def test_fake_clock_refuses_to_go_back():
    with pytest.raises(ValueError):
        FakeClock().advance(-1)


def test_queue_pops_in_deadline_order():
    q = DeadlineQueue()
    for key, d in (("c", 3), ("a", 1), ("b", 2)):
        q.push((key,), d)
    assert [key for _, _, (key,) in q.pop_due(2.5)] == ["a", "b"]
    assert q.peek() == 3


def test_silence_fires_heartbeat_timeout_at_the_deadline_not_before():
    clock, m = FakeClock(), Monitor()
    watch(m, clock)
    for seq in range(5):
        clock.advance(1)
        assert m.beat("a", "i1", seq, clock.now()) is Verdict.ACCEPTED
        assert m.tick(clock.now()) == []
    last = clock.now()
    clock.advance(2.999)
    assert m.tick(clock.now()) == []
    clock.advance(0.002)
    [sig] = m.tick(clock.now())
    assert sig.reason is Reason.HEARTBEAT_TIMEOUT and sig.deadline == pytest.approx(last + 3)
    assert sig.detail["last_seq"] == 4


def test_first_beat_after_start_grace_pulls_the_deadline_in():
    clock, m = FakeClock(), Monitor()
    watch(m, clock, start_grace=30)
    clock.advance(0.5)
    m.beat("a", "i1", 0, clock.now())
    clock.advance(3.01)  # silent after one beat: must fire at 3.5, not at the 30 s start grace
    [sig] = m.tick(clock.now())
    assert sig.reason is Reason.HEARTBEAT_TIMEOUT
    assert sig.fired_at - sig.deadline < 0.02


def test_never_beating_fires_at_the_start_grace():
    clock, m = FakeClock(), Monitor()
    watch(m, clock, start_grace=30)
    clock.advance(29.9)
    assert m.tick(clock.now()) == []
    clock.advance(0.2)
    assert [s.reason for s in m.tick(clock.now())] == [Reason.HEARTBEAT_TIMEOUT]


@pytest.mark.parametrize("service,inc,seq,expected", [
    ("nobody", "i1", 1, Verdict.UNKNOWN),
    ("a", "i0", 1, Verdict.STALE),
    ("a", "i1", 0, Verdict.DUPLICATE),   # seq 0 already seen
    ("a", "i1", 1, Verdict.ACCEPTED),
])
def test_beat_verdicts(service, inc, seq, expected):
    clock, m = FakeClock(), Monitor()
    watch(m, clock)
    m.beat("a", "i1", 0, clock.now())
    assert m.beat(service, inc, seq, clock.now()) is expected


def test_rejected_beats_do_not_count():
    clock, m = FakeClock(), Monitor()
    watch(m, clock)
    clock.advance(2)
    m.beat("a", "old-incarnation", 5, clock.now())
    m.beat("ghost", "i1", 5, clock.now())
    clock.advance(1.01)
    assert [s.reason for s in m.tick(clock.now())] == [Reason.HEARTBEAT_TIMEOUT]


def test_progress_that_does_not_move_is_no_progress():
    clock, m = FakeClock(), Monitor()
    watch(m, clock, progress=10)
    for seq in range(30):
        clock.advance(1)
        m.beat("a", "i1", seq, clock.now(), task_id="t1", progress="step:1/2")
        sigs = m.tick(clock.now())
        if sigs:
            break
    [sig] = sigs
    assert sig.reason is Reason.NO_PROGRESS and sig.task_id == "t1" and sig.progress == "step:1/2"
    assert clock.now() == pytest.approx(1000 + 1 + 10)  # task seen at t=1; stuck 10 s


def test_moving_progress_is_not_a_runaway_but_the_wall_clock_still_bounds_it():
    clock, m = FakeClock(), Monitor()
    watch(m, clock, progress=10, task=50)
    fired = []
    for seq in range(100):
        clock.advance(1)
        m.beat("a", "i1", seq, clock.now(), task_id="t1", progress=f"step:{seq}")
        fired += m.tick(clock.now())
    assert [s.reason for s in fired] == [Reason.TASK_TIMEOUT]


def test_process_exit_alerts_once_and_silences_the_incarnation():
    clock, m = FakeClock(), Monitor()
    watch(m, clock)
    sig = m.process_exited("a", "i1", clock.now(), exit_code=None, signal=9)
    assert sig.reason is Reason.PROCESS_EXIT and sig.detail == {"exit_code": None, "signal": 9}
    assert m.process_exited("a", "i1", clock.now(), exit_code=None, signal=9) is None
    clock.advance(100)
    assert m.tick(clock.now()) == []
    assert m.beat("a", "i1", 9, clock.now()) is Verdict.STALE


def test_a_new_incarnation_is_watched_afresh():
    clock, m = FakeClock(), Monitor()
    watch(m, clock, inc="i1")
    clock.advance(1)
    watch(m, clock, inc="i2")
    clock.advance(2.5)  # the i1 entry comes due and is ignored
    assert m.tick(clock.now()) == []
    clock.advance(1)
    assert [(s.incarnation, s.reason) for s in m.tick(clock.now())] == [("i2", Reason.HEARTBEAT_TIMEOUT)]


def test_queue_stays_bounded_under_many_beats():
    clock, m = FakeClock(), Monitor()
    for i in range(100):
        watch(m, clock, name=f"s{i}")
    for seq in range(50):
        clock.advance(0.1)
        for i in range(100):
            m.beat(f"s{i}", "i1", seq, clock.now())
        m.tick(clock.now())
    assert len(m._queue) <= 100


def test_monitor_thread_delivers_signals_via_the_sink():
    m, got = Monitor(), []
    done = threading.Event()
    thread = MonitorThread(m, lambda s: (got.append(s), done.set()))
    thread.start()
    try:
        import time
        m.watch("a", "i1", time.monotonic(), beat_timeout=0.05, progress_timeout=10, task_timeout=10)
        assert done.wait(5), "the monitor thread never fired"
        assert got[0].reason is Reason.HEARTBEAT_TIMEOUT
        assert got[0].fired_at >= got[0].deadline  # never before its deadline (how soon after: benchmarks/)
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_a_stall_of_the_monitor_itself_convicts_nobody_but_a_hung_agent_is_still_caught():
    from tron.common.monitor import woke_late

    clock = FakeClock()
    m = Monitor()
    for name in ("a", "b"):
        m.watch(name, f"i-{name}", clock.now(), beat_timeout=3.0, progress_timeout=10.0, task_timeout=100.0)
    m.beat("a", "i-a", 1, clock.now(), task_id="t", progress="p1")
    clock.advance(5.0)  # the whole daemon was frozen: nobody could beat
    assert woke_late(1003.0, clock.now(), 1.0) == 2.0 and woke_late(1004.5, clock.now(), 1.0) == 0.0
    m.stalled(clock.now(), 5.0)
    assert m.tick(clock.now()) == []  # nobody convicted for the daemon's own silence
    snap = m.snapshot("a")
    assert snap.last_beat == clock.now() and snap.progress_since == 1005.0 and snap.task_since == 1005.0
    m.beat("a", "i-a", 2, clock.now() + 1, task_id="t", progress="p2")
    clock.advance(3.01)  # "b" really is hung: caught one beat_timeout after the grace began
    fired = m.tick(clock.now())
    assert [(s.service, s.reason) for s in fired] == [("b", "heartbeat_timeout")]


def test_the_monitor_thread_waits_while_the_event_loop_is_stalled():
    clock = FakeClock()
    m = Monitor()
    m.watch("a", "i-a", clock.now(), beat_timeout=1.0, progress_timeout=10.0, task_timeout=100.0)
    thread = MonitorThread(m, lambda s: None, clock, stall_after=0.5)
    m.loop_seen = clock.now()
    clock.advance(2.0)
    assert thread._loop_stalled(clock.now())  # beats may be waiting unread: judge nobody
    m.loop_seen = clock.now()
    assert not thread._loop_stalled(clock.now())
    assert m.stalls == [(1002.0, 2.0)] and m.tick(clock.now()) == []


@pytest.mark.parametrize("stalls, beats_between, caught", [
    (1, False, False),  # one stall: a fresh grace, as before
    (3, False, False),  # up to MAX_EXCUSES stalls in a row are excused
    (4, False, True),   # a fourth without a beat between: its silence is its own
    (6, True, False),   # an agent that beats between the stalls is excused every time
])
def test_a_daemon_starved_again_and_again_does_not_postpone_a_hung_agents_detection_for_ever(
        stalls, beats_between, caught):
    from tron.common.monitor import MAX_EXCUSES

    assert MAX_EXCUSES == 3
    clock = FakeClock()
    m = Monitor()
    m.watch("a", "i-a", clock.now(), beat_timeout=3.0, progress_timeout=100.0, task_timeout=1000.0)
    seq, fired = 0, []
    for i in range(stalls):
        clock.advance(2.5)  # just short of the deadline, then the daemon is frozen for 2 s
        if beats_between:
            seq += 1
            m.beat("a", "i-a", seq, clock.now())
        clock.advance(2.0)
        m.stalled(clock.now(), 2.0)
        fired += m.tick(clock.now())
        if i < 3:
            assert fired == []  # the first stalls excuse it: nobody is convicted for the daemon's silence
    clock.advance(2.9)  # short of a beat_timeout after the last stall
    fired += m.tick(clock.now())
    assert bool(fired) is caught, fired
