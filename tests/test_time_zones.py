"""Due times do not depend on the host's time zone (issue 13 §7).

Huey's RedisStorage scores the schedule with time.mktime, which reads the
naive UTC eta as *local* time: a worker and a scheduler in different zones
disagreed by the difference of their offsets (a delayed task came due
hours early and bounced between worker and scheduler until its eta, or
hours late), and on one host the score jumped back by the DST shift at the
transition (a task came due up to an hour, 30 minutes on Lord Howe,
early).  The suite's storage scores with unix seconds.  The zones: New
York and London (1 h DST), Lord Howe (30 min DST), Kathmandu (+5:45, none).
"""
import calendar
import datetime
import json
import os
import sys
import time

import pytest

from ops_helpers import task_record, wait_until

# (zone, the naive UTC minute at which mktime's offset changes)
TRANSITIONS = [
    ('America/New_York', datetime.datetime(2025, 3, 9, 3, 0)),
    ('America/New_York', datetime.datetime(2025, 11, 2, 2, 0)),
    ('Europe/London', datetime.datetime(2025, 3, 30, 2, 0)),
    ('Europe/London', datetime.datetime(2025, 10, 26, 1, 0)),
    ('Australia/Lord_Howe', datetime.datetime(2025, 4, 6, 2, 0)),
    ('Australia/Lord_Howe', datetime.datetime(2025, 10, 5, 2, 30)),
    ('Asia/Kathmandu', datetime.datetime(2025, 6, 1, 0, 0)),
]


@pytest.fixture
def zone(monkeypatch):
    """Switch this process's local zone (TZ + tzset); restored after."""
    def switch(name):
        monkeypatch.setenv('TZ', name)
        time.tzset()
    yield switch
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize('name,moment', TRANSITIONS,
                         ids=['%s-%s' % (z, m.date()) for z, m in TRANSITIONS])
def test_schedule_scores_are_unix_seconds_across_dst(producer, zone, name,
                                                     moment):
    if not os.path.exists('/usr/share/zoneinfo/' + name):
        pytest.skip('no tz data for %s' % name)
    zone(name)
    storage = producer.storage
    scores = []
    for seconds in range(-2 * 3600, 2 * 3600, 300):
        eta = moment + datetime.timedelta(seconds=seconds, microseconds=250)
        score = storage.convert_ts(eta)
        assert score == calendar.timegm(eta.timetuple()) + 0.00025, eta
        scores.append(score)
    # Later etas, higher scores: five minutes apart everywhere.
    assert [b - a for a, b in zip(scores, scores[1:])] == \
        [300.0] * (len(scores) - 1)


def test_aware_and_local_etas(producer, zone):
    zone('Australia/Lord_Howe')
    storage = producer.storage
    aware = datetime.datetime(2025, 10, 5, 2, 45,
                              tzinfo=datetime.timezone.utc)
    assert storage.convert_ts(aware) == aware.timestamp()
    lord_howe = datetime.timezone(datetime.timedelta(hours=11))
    assert storage.convert_ts(aware.astimezone(lord_howe)) == \
        aware.timestamp()
    # An app running Huey with utc=False: naive etas are local time.
    local = datetime.datetime(2025, 7, 1, 12, 0)
    storage.utc = False
    try:
        assert storage.convert_ts(local) == time.mktime(local.timetuple())
    finally:
        del storage.utc
    assert storage.convert_ts(local) == calendar.timegm(local.timetuple())


def test_the_scheduler_due_score_is_its_wall_clock(producer):
    from huey_worker.scheduler.delayed import DelayedMover
    mover = DelayedMover(producer.storage.conn, producer.storage, 'lease')
    eta = datetime.datetime(2025, 3, 9, 3, 0, 10)
    score = producer.storage.convert_ts(eta)
    assert mover.due_score(score - 1) < score <= mover.due_score(score)


# -- real daemons in different zones ---------------------------------------

ZONE_PAIRS = [('Asia/Kathmandu', 'America/New_York'),
              ('America/New_York', 'Australia/Lord_Howe'),
              ('Australia/Lord_Howe', 'Europe/London')]


def redis_time(conn):
    seconds, micros = conn.time()
    return seconds + micros / 1e6


@pytest.mark.slow
@pytest.mark.parametrize('consumer_zone,scheduler_zone', ZONE_PAIRS)
def test_a_consumer_and_a_scheduler_in_different_zones(
        producer, base_env, start_daemon, tmp_path, consumer_zone,
        scheduler_zone):
    """The worker scores a delayed task's eta and a retry's; the scheduler,
    in another zone, moves each exactly once, not before its eta by Redis's
    clock, and both run exactly as often as they should."""
    import importlib
    import delivery_tasks
    tasks = importlib.import_module('scheduler_tasks')
    conn = producer.storage.conn
    try:
        env = dict(base_env,
                   HUEY_MODULES='sample_tasks,delivery_tasks,scheduler_tasks')
        scheduler = start_daemon(['scheduler', '--set',
                                  'scheduler.interval=0.2'],
                                 dict(env, TZ=scheduler_zone), 'scheduler')
        consumer = start_daemon(['consumer', '--workers', '2'],
                                dict(env, TZ=consumer_zone), 'consumer')
        scheduler.wait_for_output('became leader')
        consumer.wait_for_output('consumer ready')
        sent_at = redis_time(conn)
        delayed = delivery_tasks.slow_counted.schedule((0, 'delayed'),
                                                       delay=2)
        retry_log = tmp_path / 'retry.log'
        retried = tasks.fail_then_retry_later(str(retry_log))
        delayed.get(blocking=True, timeout=30)
        wait_until(lambda: retry_log.exists() and
                   retry_log.read_text().count('run') == 2, 30,
                   what='the retry to run')
        wait_until(lambda: (task_record(producer, retried.id) or {}).get(
            'state') == 'complete', what='the retry to complete')
        record = task_record(producer, delayed.id)
        # Not before its eta by Redis's clock (one machine: the worker's
        # clock is Redis's).
        assert record['started'] >= sent_at + 2
        assert conn.hget('test:runs', 'delayed') == b'1'
        time.sleep(1)    # a bounce would go on moving them
        assert retry_log.read_text() == 'run\nrun\n'
        info = json.loads(conn.get(producer.keys.scheduler_info))
        assert info['delayed_moved'] == 2, info
        assert conn.zcard(producer.storage.schedule_key) == 0
    finally:
        for wrapper in (tasks.every_minute, tasks.report,
                        tasks.fail_then_retry_later):
            wrapper.unregister()
        sys.modules.pop('scheduler_tasks', None)
