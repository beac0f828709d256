"""The watcher's alarm for its own waits (common/stall.py): a real thread and real time, short limits."""

import time

from common.stall import StallAlarm


def test_a_wait_longer_than_the_limit_is_said_while_it_lasts_and_again_when_it_ends():
    said: list[tuple[float, str]] = []
    alarm = StallAlarm(lambda line: said.append((time.monotonic(), line)), after_s=0.3, tick_s=0.05)
    t0 = time.monotonic()
    with alarm.waiting_on("the store (s3://b/runs/x)"):
        time.sleep(0.8)
        during = list(said)
    alarm.close()
    assert len(during) == 1  # said once, while the call still waited
    at, line = during[0]
    assert 0.3 <= at - t0 < 0.7
    assert line.startswith("the store (s3://b/runs/x) has not answered for ")
    assert said[-1][1].startswith("the store (s3://b/runs/x) answered after ")
    assert len(said) == 2


def test_calls_inside_the_limit_say_nothing():
    said: list[str] = []
    alarm = StallAlarm(said.append, after_s=0.3, tick_s=0.05)
    for _ in range(10):
        with alarm.waiting_on("Slurm"):
            time.sleep(0.05)
        time.sleep(0.05)  # between calls nothing is waited on, however long
    time.sleep(0.5)
    alarm.close()
    assert said == []


def test_the_alarm_thread_is_a_daemon_and_stops_when_closed():
    alarm = StallAlarm(lambda line: None, after_s=1, tick_s=0.05)
    with alarm.waiting_on("x"):
        pass
    thread = alarm._thread
    assert thread is not None and thread.daemon
    alarm.close()
    thread.join(1)
    assert not thread.is_alive()
