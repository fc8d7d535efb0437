"""The scheduler's parts against a real Redis, in-process: the lease, the
scripts that act only for the lease holder, slot planning and the INI
periodic entries.  tests/test_scheduler.py runs the daemon itself."""
import datetime
import json
import textwrap

import pytest
import redis

from huey_worker import config
from huey_worker.config import ConfigError
from huey_worker.scheduler import periodic, read_status
from huey_worker.scheduler.delayed import DelayedMover
from huey_worker.scheduler.info import InfoWriter
from huey_worker.scheduler.lease import Lease

UTC = datetime.timezone.utc
T0 = datetime.datetime(2030, 1, 1, 12, 0, 10, tzinfo=UTC).timestamp()


def at(hhmmss):
    h, m, s = (int(x) for x in hhmmss.split(':'))
    return datetime.datetime(2030, 1, 1, h, m, s, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def conn(redis_url):
    client = redis.Redis.from_url(redis_url, protocol=2)
    yield client
    client.close()


@pytest.fixture
def keys(producer):
    return producer.storage.keys


# -- the lease -------------------------------------------------------------

def test_one_holder_renewal_and_compare_and_delete(conn, keys):
    a = Lease(conn, keys.scheduler_lease, 'host-a:1:aa', 10)
    b = Lease(conn, keys.scheduler_lease, 'host-b:2:bb', 10)
    assert a.try_acquire() and a.held()
    assert not b.try_acquire() and not b.held()
    assert b.holder == 'host-a:1:aa'
    assert 0 < b.holder_ttl <= 9.0          # 90% of lease_timeout
    assert a.renew() and a.held()
    assert conn.pttl(keys.scheduler_lease) > 8500
    # b never held it: its release leaves a's lease alone
    assert not b.release()
    assert conn.get(keys.scheduler_lease) == b'host-a:1:aa'
    assert a.release() and not a.held()
    assert conn.get(keys.scheduler_lease) is None
    assert b.try_acquire() and b.holder == 'host-b:2:bb'
    status = read_status(conn, keys)
    assert status['leader'] == 'host-b:2:bb' and status['lease_ttl'] > 8


def test_renewal_fails_once_the_key_is_someone_elses(conn, keys):
    a = Lease(conn, keys.scheduler_lease, 'a:1:x', 10)
    assert a.try_acquire()
    conn.set(keys.scheduler_lease, 'b:2:y', px=5000)  # a's ran out, b took it
    assert not a.renew()
    assert not a.held() and not a.expired_locally()
    assert conn.get(keys.scheduler_lease) == b'b:2:y'
    assert conn.pttl(keys.scheduler_lease) <= 5000   # b's lease untouched


def test_the_local_deadline_comes_before_the_redis_expiry(conn, keys):
    clock = FakeClock(1000.0)
    lease = Lease(conn, keys.scheduler_lease, 'a:1:x', 10, clock=clock)
    assert lease.try_acquire()
    redis_ttl = conn.pttl(keys.scheduler_lease) / 1000.0
    # Trusted locally for less than Redis keeps the key, counted from the
    # moment the command was sent.
    assert lease.valid_until - 1000.0 < redis_ttl <= lease.ttl
    clock.now = lease.valid_until - 0.001
    assert lease.held()
    clock.now = lease.valid_until
    assert not lease.held() and lease.expired_locally()


def test_standby_retries_right_after_the_lease_would_run_out(conn, keys):
    a = Lease(conn, keys.scheduler_lease, 'a:1:x', 3)
    b = Lease(conn, keys.scheduler_lease, 'b:2:y', 3)
    assert a.try_acquire()
    conn.pexpire(keys.scheduler_lease, 300)
    assert not b.try_acquire()
    assert b.next_attempt_in() <= 0.32


# -- actions only for the lease holder -------------------------------------

def _entry(key='code:t', make=None):
    import sample_tasks
    return periodic.PeriodicEntry(
        key=key, task_name='sample_tasks.add', schedule='* * * * *',
        matches=lambda dt: True,
        make_task=make or (lambda: sample_tasks.add.s(1, 2)), origin='test')


def test_a_paused_leader_that_lost_the_lease_cannot_act(producer, conn, keys):
    """The guard inside Redis: the token that lost the lease enqueues,
    moves and publishes nothing, even when its local state says leader."""
    import sample_tasks
    storage = producer.storage
    old = Lease(conn, keys.scheduler_lease, 'old:1:x', 10)
    assert old.try_acquire() and old.held()
    conn.set(keys.scheduler_lease, 'new:2:y')   # taken over while paused
    due = sample_tasks.add.s(5, 5)
    due.eta = periodic.naive_utc(T0 - 30)
    producer.add_schedule(due)

    enqueuer = periodic.SlotEnqueuer(conn, producer, keys.scheduler_lease,
                                     86400)
    mover = DelayedMover(conn, storage, keys.scheduler_lease)
    info = InfoWriter(conn, keys)
    slots = [(_entry(), periodic.minute_of(T0))]
    assert old.held()   # its own clock has not noticed
    assert enqueuer.enqueue('old:1:x', slots, T0) == ([], False)
    assert mover.move_batch('old:1:x', T0) is None
    assert not info.write('old:1:x', {'leader': 'old:1:x'})
    assert conn.llen(storage.queue_key) == 0
    assert conn.zcard(storage.schedule_key) == 1
    assert not conn.keys(keys.prefix + 'periodic:*')
    assert conn.get(keys.scheduler_info) is None

    # The holder's token does act.
    done, still = enqueuer.enqueue('new:2:y', slots, T0)
    assert still and len(done) == 1
    assert len(mover.move_batch('new:2:y', T0)) == 1
    assert info.write('new:2:y', {'leader': 'new:2:y'})
    assert conn.llen(storage.queue_key) == 2


def test_each_slot_is_enqueued_once(producer, conn, keys):
    conn.set(keys.scheduler_lease, 'a:1:x')
    enqueuer = periodic.SlotEnqueuer(conn, producer, keys.scheduler_lease,
                                     86400)
    minute = periodic.minute_of(T0)
    entry_a, entry_b = _entry('code:a'), _entry('config:b')
    done, _ = enqueuer.enqueue('a:1:x', [(entry_a, minute),
                                         (entry_b, minute)], T0)
    assert len(done) == 2
    conn.set(keys.scheduler_lease, 'b:2:y')   # another leader, same minute
    done, still = enqueuer.enqueue('b:2:y', [(entry_a, minute),
                                             (entry_a, minute + 60)], T0 + 50)
    assert still and [(e.key, m) for e, m, _ in done] == \
        [('code:a', minute + 60)]
    assert conn.llen(producer.storage.queue_key) == 3
    # Each task's journal record has its enqueue time from the push itself,
    # before any worker can take it (the wait-time histogram counts from
    # it); the enqueue signal writes the rest later.
    (_, _, task), = done
    assert float(conn.hget(keys.task(task.id), 'enqueued')) == T0 + 50
    assert 0 < conn.ttl(keys.task(task.id))
    value = json.loads(conn.get(enqueuer.dedupe_key(entry_a, minute)))
    assert value['leader'] == 'a:1:x' and value['slot'] == '2030-01-01T12:00Z'
    assert 86000 < conn.ttl(enqueuer.dedupe_key(entry_a, minute)) <= 86400


def test_a_periodic_task_with_a_priority_keeps_it(producer, conn, keys):
    """@huey.periodic_task(..., priority=N): its slots enter the queue
    ranked, as any task enqueued with that priority."""
    import sample_tasks
    from huey_worker.storage import message_data, message_priority
    storage = producer.storage
    conn.set(keys.scheduler_lease, 'a:1:x')
    enqueuer = periodic.SlotEnqueuer(conn, producer, keys.scheduler_lease,
                                     86400)
    minute = periodic.minute_of(T0)
    sample_tasks.add(0, 0)                       # plain, already waiting
    ranked = _entry('code:ranked',
                    lambda: sample_tasks.add.s(7, 7, priority=4))
    done, still = enqueuer.enqueue('a:1:x', [(ranked, minute),
                                             (_entry(), minute)], T0)
    assert still and len(done) == 2
    members = conn.zrange(storage.priority_key, 0, -1, withscores=True)
    assert [(message_priority(m), score) for m, score in members] == \
        [(4, -4.0)]
    assert producer.serializer.deserialize(message_data(
        members[0][0])).args == (7, 7)
    assert storage.queue_size() == 3
    taken = [producer.serializer.deserialize(m).args
             for m in storage.enqueued_items()]
    assert taken == [(7, 7), (0, 0), (1, 2)]


def test_due_tasks_move_in_order_in_bounded_batches(producer, conn, keys):
    import sample_tasks
    storage = producer.storage
    conn.set(keys.scheduler_lease, 'a:1:x')
    ids = []
    for offset in (40, 10, 30, 20, -5):   # seconds after T0
        task = sample_tasks.add.s(offset, 0)
        task.eta = periodic.naive_utc(T0 + offset)
        producer.add_schedule(task)
        ids.append((offset, task.id))
    mover = DelayedMover(conn, storage, keys.scheduler_lease, batch=2)

    def queue_ids():
        # The queue is read from the right: that end comes first.
        raw = conn.lrange(storage.queue_key, 0, -1)[::-1]
        return [producer.serializer.deserialize(m).id for m in raw]

    by_offset = dict(ids)
    assert len(mover.move_batch('a:1:x', T0 + 25)) == 2
    assert len(mover.move_batch('a:1:x', T0 + 25)) == 1
    assert mover.move_batch('a:1:x', T0 + 25) == []
    assert queue_ids() == [by_offset[-5], by_offset[10], by_offset[20]]
    assert mover.pending_count() == 2
    assert len(mover.move_batch('a:1:x', T0 + 100)) == 2
    assert queue_ids()[3:] == [by_offset[30], by_offset[40]]


# -- slots -----------------------------------------------------------------

def test_slot_names_are_utc_minutes():
    assert periodic.slot_name(periodic.minute_of(at('12:03:59'))) == \
        '2030-01-01T12:03Z'
    assert periodic.parse_slot_name('2030-01-01T12:03Z') == at('12:03:00')
    assert periodic.parse_slot_name('garbage') is None
    assert periodic.naive_utc(at('12:03:07')) == \
        datetime.datetime(2030, 1, 1, 12, 3, 7)


def _crontab_entry(key, spec):
    from huey import crontab
    return periodic.PeriodicEntry(key=key, task_name='t', schedule=spec,
                                  matches=crontab(*spec.split()),
                                  make_task=None, origin='test')


def _slots(result):
    return [(e.key, periodic.slot_name(m)[11:16]) for e, m in result.due]


def test_plan_current_minute_and_catch_up_window():
    every = _crontab_entry('every', '* * * * *')
    even = _crontab_entry('even', '*/2 * * * *')
    entries = [every, even]
    # Nothing known: the current minute only.
    result = periodic.plan(entries, None, at('12:05:30'), 12)
    assert _slots(result) == [('every', '12:05')]
    assert result.evaluated == at('12:05:00')
    # Resuming after 12:00 at 12:05:30 with a 12 s window: the current
    # minute always, the earlier ones are skipped (and reported).
    result = periodic.plan(entries, at('12:01:00'), at('12:05:30'), 12)
    assert _slots(result) == [('every', '12:05')]
    assert (result.skipped_from, result.skipped_to) == (at('12:01:00'),
                                                        at('12:04:00'))
    # A 150 s window reaches back to 12:03:00.
    result = periodic.plan(entries, at('12:01:00'), at('12:05:30'), 150)
    assert _slots(result) == [('every', '12:03'), ('every', '12:04'),
                              ('even', '12:04'), ('every', '12:05')]
    assert result.skipped_to == at('12:02:00')
    # A handover longer than a minute (lease_timeout 100 s: the window is
    # at least 110 s): the slot of 12:05, missed by 68 s, is not dropped.
    result = periodic.plan(entries, at('12:05:00'), at('12:06:08'), 110)
    assert _slots(result) == [('every', '12:05'), ('every', '12:06'),
                              ('even', '12:06')]
    assert result.skipped_from is None
    # A leader whose clock ran ahead evaluated 12:06 already.
    assert periodic.plan(entries, at('12:07:00'), at('12:06:50'), 12) is None


def test_a_long_catch_up_is_cut_at_whole_minutes():
    every = _crontab_entry('every', '* * * * *')
    even = _crontab_entry('even', '*/2 * * * *')
    result = periodic.plan([every, even], at('12:00:00'), at('12:30:30'),
                           3600, limit=5)
    # 12:00 (2 slots), 12:01 (1), 12:02 (2): the limit is reached there.
    assert _slots(result) == [('every', '12:00'), ('even', '12:00'),
                              ('every', '12:01'), ('every', '12:02'),
                              ('even', '12:02')]
    assert result.evaluated == at('12:02:00')
    rest = periodic.plan([every, even], result.evaluated + 60, at('12:30:30'),
                         3600, limit=5)
    assert _slots(rest)[0] == ('every', '12:03')


def test_plan_skips_an_entry_whose_check_fails():
    def broken(dt):
        raise RuntimeError('bad validate_datetime')
    entries = [periodic.PeriodicEntry('bad', 't', 'code', broken, None, ''),
               _crontab_entry('ok', '* * * * *')]
    failed = []
    result = periodic.plan(entries, None, at('12:00:01'), 0,
                           on_error=lambda e, m: failed.append(e.key))
    assert _slots(result) == [('ok', '12:00')] and failed == ['bad']


# -- INI entries -----------------------------------------------------------

def _load(tmp_path, text):
    path = tmp_path / 'hw.ini'
    path.write_text(textwrap.dedent(text))
    return config.load(str(path), environ={}), str(path)


def test_ini_entries_name_registered_tasks(producer, tmp_path):
    cfg, path = _load(tmp_path, """\
        [periodic:sum]
        task = sample_tasks.add
        schedule = 0 2 * * *
        args = [1, 2]

        [periodic:paused]
        task = sample_tasks.add
        schedule = * * * * *
        args = [3, 4]
        enabled = false
        """)
    entries = periodic.config_entries(cfg, producer)
    assert [e.key for e in entries] == ['config:sum']
    entry = entries[0]
    assert entry.origin == '[periodic:sum] in %s:3' % path
    assert entry.matches(datetime.datetime(2030, 1, 1, 2, 0))
    assert not entry.matches(datetime.datetime(2030, 1, 1, 2, 1))
    task = entry.make_task()
    assert task.name == 'add' and task.args == (1, 2)
    assert entry.make_task().id != task.id


def test_ini_unknown_task_names_the_section_file_and_line(producer, tmp_path):
    cfg, path = _load(tmp_path, """\
        [scheduler]
        lease_timeout = 5

        [periodic:nightly]
        schedule = 0 2 * * *
        task = sample_tasks.ad
        """)
    with pytest.raises(ConfigError) as info:
        periodic.config_entries(cfg, producer)
    text = str(info.value)
    assert '[periodic:nightly] task' in text and 'line 6' in text
    assert path in text and "did you mean 'sample_tasks.add'" in text


def test_ini_arguments_must_fit_the_task(producer, tmp_path):
    cfg, path = _load(tmp_path, """\
        [periodic:sum]
        task = sample_tasks.add
        schedule = * * * * *
        args = [1, 2, 3]
        """)
    with pytest.raises(ConfigError) as info:
        periodic.config_entries(cfg, producer)
    assert '[periodic:sum] args' in str(info.value)
    assert 'line 4' in str(info.value)


@pytest.mark.parametrize('schedule', ['61 * * * *', '*/5 * *', '1,x * * * *',
                                      '0 2 * * mon'])
def test_bad_crontab_is_a_config_error_naming_the_line(tmp_path, schedule):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, """\
            [periodic:bad]
            task = sample_tasks.add
            schedule = %s
            """ % schedule)
    assert '[periodic:bad] schedule' in str(info.value)
    assert 'line 3' in str(info.value)
