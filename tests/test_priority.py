"""Task priorities (issue 14): Huey's `priority=` runs in priority order
under the suite, plain tasks counting as priority 0, with the guarantees of
the plain queue: the move into the worker's in-flight list is atomic, and a
message put back (a dead worker or consumer, a delayed or retrying task, a
requeued dead letter) keeps its priority.  The queue without priorities
keeps its one-command hot path (BRPOPLPUSH).

This module is also the consumer's task module in the tests below
(HUEY_MODULES names it): its tasks record the order they run in."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from huey_worker import huey
from huey_worker.journal import current_delivery
from ops_helpers import wait_until

ORDER = 'test:priority-order'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(tag):
    huey.storage.conn.rpush(ORDER, tag)
    return tag


@huey.task()
def record(tag):
    return _record(tag)


@huey.task(priority=10)
def urgent(tag):
    return _record(tag)


@huey.task(priority=7)
def held(tag, gate):
    """Records its run (with the delivery count), then runs until `gate`
    exists."""
    _record('%s:%d' % (tag, current_delivery()))
    while not os.path.exists(gate):
        time.sleep(0.02)
    return tag


@huey.task(retries=1, retry_delay=1, priority=5)
def fail_first(tag, path):
    if not os.path.exists(path):
        open(path, 'w').close()
        raise RuntimeError('the first attempt fails')
    return _record(tag)


@huey.task()
def wait_for_gate(tag, gate):
    _record(tag)
    while not os.path.exists(gate):
        time.sleep(0.02)
    return tag


# -- the storage on its own ---------------------------------------------------

@pytest.fixture
def storage(redis_url):
    from huey_worker.storage import SuiteStorage
    return SuiteStorage('prio', connection_pool=redis.ConnectionPool.from_url(
        redis_url, protocol=2))


def take_all(storage, inflight='inflight', timeout=1):
    """Every message, in the order workers get them (each acked)."""
    from huey_worker.storage import message_data
    storage.pin_connection()
    out = []
    while True:
        raw = storage.dequeue_into(inflight, timeout)
        if raw is None:
            if not storage.conn.llen(storage.queue_key) and \
                    not storage.conn.zcard(storage.priority_key):
                return out
            continue
        assert storage.conn.lrange(inflight, 0, -1) == [raw]
        storage.conn.lrem(inflight, 1, raw)
        out.append(message_data(raw))


def test_higher_priority_first_fifo_within_plain_count_as_zero(storage):
    storage.enqueue(b'\x80plain-1')
    storage.enqueue(b'\x80p5-a', 5)
    storage.enqueue(b'\x80neg', -1)
    storage.enqueue(b'\x80p10', 10)
    storage.enqueue(b'\x80plain-2', 0)          # 0 is plain
    storage.enqueue(b'\x80p5-b', 5.0)           # same priority as 5
    storage.enqueue(b'\x80p2.5', 2.5)
    storage.enqueue(b'\x80plain-3', None)
    expected = [b'\x80p10', b'\x80p5-a', b'\x80p5-b', b'\x80p2.5',
                b'\x80plain-1', b'\x80plain-2', b'\x80plain-3', b'\x80neg']
    # The marker at the head of the list is no message.
    assert storage.queue_size() == 8
    assert storage.conn.llen(storage.queue_key) == 4
    assert storage.enqueued_items() == expected
    assert storage.enqueued_items(3) == expected[:3]
    assert take_all(storage) == expected
    assert storage.queue_size() == 0
    # Nothing left behind: no marker, no set.
    assert not storage.conn.exists(storage.queue_key, storage.priority_key)


def test_a_priority_message_arriving_later_goes_first(storage):
    for i in range(3):
        storage.enqueue(b'\x80plain-%d' % i)
    storage.pin_connection()
    first = storage.dequeue_into('inflight', 1)
    assert first == b'\x80plain-0'
    storage.conn.lrem('inflight', 1, first)
    storage.enqueue(b'\x80late', 3)
    assert take_all(storage) == [b'\x80late', b'\x80plain-1', b'\x80plain-2']


def test_hueys_own_read_takes_priorities_first_too(producer):
    """huey.dequeue() (what huey_consumer calls) finds the set as well."""
    record('plain')
    record('p2', priority=2)
    record('neg', priority=-2)
    got = []
    while True:
        task = producer.dequeue()
        if task is None:
            break
        got.append(task.args[0])
    assert got == ['p2', 'plain', 'neg']
    assert producer.pending_count() == 0
    assert not producer.storage.conn.keys('hw:huey:dequeue*')


def test_the_plain_hot_path_is_one_brpoplpush_per_message(storage):
    conn = storage.conn
    for i in range(20):
        storage.enqueue(b'\x80m%d' % i)
    conn.config_resetstat()   # our own private server
    assert len(take_all(storage, timeout=1)) == 20
    stats = conn.info('commandstats')
    assert stats['cmdstat_brpoplpush']['calls'] == 21   # the last: timed out
    assert not any(name in stats for name in (
        'cmdstat_evalsha', 'cmdstat_eval', 'cmdstat_zrange', 'cmdstat_zadd'))


def test_with_priorities_a_message_costs_one_command_too(storage):
    """After the first read finds the marker, the worker asks the set
    first (TAKE) and needs no BRPOPLPUSH while it holds messages."""
    conn = storage.conn
    for i in range(20):
        storage.enqueue(b'\x80m%d' % i, i % 3)
    conn.config_resetstat()
    assert len(take_all(storage)) == 20
    stats = conn.info('commandstats')
    reads = sum(stats.get('cmdstat_' + name, {}).get('calls', 0)
                for name in ('brpoplpush', 'evalsha', 'eval'))
    # 13 TAKEs, 8 BRPOPLPUSH (the first found the marker, the last timed
    # out), and at most two for loading the script.
    assert reads <= 20 + 3, stats


def test_the_marker_wakes_a_reader_blocked_on_the_empty_list(storage):
    storage.pin_connection()
    got = []
    reader = threading.Thread(target=lambda: got.append(
        storage.dequeue_into('inflight', 10)))
    reader.start()
    time.sleep(0.3)   # blocked on the empty list by now
    other = redis.Redis(connection_pool=storage.pool)
    started = time.monotonic()
    from huey_worker.storage import SuiteStorage
    SuiteStorage('prio', connection_pool=storage.pool).enqueue(b'\x80x', 4)
    reader.join(5)
    assert time.monotonic() - started < 2
    from huey_worker.storage import message_data
    assert [message_data(m) for m in got] == [b'\x80x']
    assert other.llen('inflight') == 1 and not other.exists(
        storage.queue_key, storage.priority_key)


def test_a_read_whose_script_redis_forgot_is_sent_again(storage):
    """The TAKE sent with an ack finds Redis's script cache flushed (a
    restart): nothing moved, and the read is made again."""
    storage.pin_connection()
    for i in range(3):
        storage.enqueue(b'\x80m%d' % i, 1)
    first = storage.dequeue_into('inflight', 1)
    storage.conn.lrem('inflight', 1, first)
    storage.conn.script_flush()
    storage.stage_command('SET', 'acked', 'yes')
    storage.flush_and_prefetch('inflight', 1)
    second = storage.dequeue_into('inflight', 1)
    assert storage.conn.get('acked') == b'yes'
    storage.conn.lrem('inflight', 1, second)
    storage.conn.script_flush()
    storage.flush_and_prefetch('inflight', 1)
    storage.flush_all(('GET', 'acked'))   # the reply read out of turn
    third = storage.dequeue_into('inflight', 1)
    from huey_worker.storage import message_data
    assert [message_data(m) for m in (first, second, third)] == \
        [b'\x80m0', b'\x80m1', b'\x80m2']


def test_priorities_must_be_numbers(storage):
    for bad in (float('nan'), float('inf'), 'high', '7', b'7', 10 ** 400,
                object()):
        with pytest.raises(ValueError, match='must be a finite number'):
            storage.enqueue(b'\x80x', bad)
    assert storage.queue_size() == 0


def test_flushing_the_queue_clears_both(storage, producer):
    storage.enqueue(b'\x80a')
    storage.enqueue(b'\x80b', 3)
    storage.flush_queue()
    assert storage.queue_size() == 0
    assert not storage.conn.exists(storage.queue_key, storage.priority_key)
    # Huey's flush() (flush_all without arguments) too.
    record('x')
    record('y', priority=2)
    assert producer.pending_count() == 2
    producer.flush()
    assert producer.pending_count() == 0
    conn = producer.storage.conn
    assert not conn.exists(producer.storage.queue_key,
                           producer.storage.priority_key)


# -- putting messages back keeps their priority -------------------------------

def test_requeue_of_an_inflight_list_keeps_priority_and_place(storage):
    from huey_worker.delivery import Delivery
    from huey_worker.storage import MARKER
    conn = storage.conn
    storage.pin_connection()
    storage.enqueue(b'\x80p4-first', 4)
    storage.enqueue(b'\x80plain-held')
    taken = storage.dequeue_into('w0', 1)                  # p4-first
    storage.enqueue(b'\x80p4-second', 4)
    storage.enqueue(b'\x80p9', 9)
    # Two workers died: one had just read the marker, one a plain message.
    assert conn.rpoplpush(storage.queue_key, 'w1') == MARKER
    conn.lpush('w2', conn.lpop(storage.queue_key))          # plain-held
    delivery = Delivery(storage)
    assert delivery.requeue_list('w0', 'lost') == 1
    assert delivery.requeue_list('w1', 'lost') == 0         # a marker only
    assert conn.lrange(storage.queue_key, 0, -1) == [MARKER]
    assert delivery.requeue_list('w2', 'lost') == 1
    assert conn.lrange(storage.queue_key, 0, -1) == [b'\x80plain-held',
                                                      MARKER]
    # Its old place: ahead of the p4 enqueued after it; plain still after.
    assert take_all(storage) == [b'\x80p9', b'\x80p4-first',
                                 b'\x80p4-second', b'\x80plain-held']
    assert taken.endswith(b'\x80p4-first')


def test_recovery_of_a_dead_consumer_keeps_priority(storage):
    from huey_worker.delivery import Delivery
    from huey_worker.storage import tag_message
    keys, conn = storage.keys, storage.conn
    lists = [keys.inflight('ghost', i, 'gone') for i in range(2)]
    conn.sadd(keys.consumer_lists('ghost'), *lists)
    conn.lpush(lists[0], tag_message(b'\x80p6', 6, seq=1))
    conn.lpush(lists[1], b'\x80plain')
    conn.zadd(keys.consumers, {'ghost': time.time() - 100})
    storage.enqueue(b'\x80plain-waiting')
    storage.enqueue(b'\x80p1', 1)
    assert Delivery(storage).recover_dead(10) == {'ghost': 2}
    assert storage.queue_size() == 4
    assert take_all(storage) == [b'\x80p6', b'\x80p1', b'\x80plain',
                                 b'\x80plain-waiting']


def test_the_worker_puts_an_interrupted_priority_task_back(storage):
    from huey_worker.storage import MARKER
    conn = storage.conn
    storage.pin_connection()
    storage.enqueue(b'\x80plain')
    storage.enqueue(b'\x80p2', 2)
    raw = storage.dequeue_into('w', 1)
    storage.stage_put_back('w', raw)
    storage.flush()
    assert conn.llen('w') == 0
    assert conn.lrange(storage.queue_key, 0, -1) == [b'\x80plain', MARKER]
    storage.enqueue(b'\x80p2-later', 2)
    assert take_all(storage) == [b'\x80p2', b'\x80p2-later', b'\x80plain']


def test_a_requeued_dead_letter_finds_its_priority(storage):
    """The dead letters keep the message as the queue held it; requeueing
    pushes it on the head of the list, and the first worker to read it
    puts it where its priority says."""
    from huey_worker.storage import message_priority
    storage.pin_connection()
    storage.enqueue(b'\x80p3', 3)
    raw = storage.dequeue_into('w', 1)
    storage.conn.lrem('w', 1, raw)             # now a dead letter's message
    assert message_priority(raw) == 3
    storage.enqueue(b'\x80p8', 8)
    storage.enqueue(b'\x80plain')
    storage.enqueue(b'\x80p1', 1)
    storage.conn.rpush(storage.queue_key, raw)     # REQUEUE_RECORD's RPUSH
    assert take_all(storage) == [b'\x80p8', b'\x80p3', b'\x80p1',
                                 b'\x80plain']


def test_delayed_tasks_reenter_with_their_priority(producer):
    from huey_worker.scheduler.delayed import DelayedMover
    from huey_worker.scheduler.periodic import naive_utc
    from huey_worker.storage import message_priority, message_data
    storage, keys = producer.storage, producer.keys
    conn = storage.conn
    due = naive_utc(1000)
    plain_task, p5_task = record.s('plain'), record.s('p5', priority=5)
    # Huey schedules while the worker defers its writes, with the task's
    # priority known; a task body scheduling something does not defer.
    storage.deferring = True
    for task in (plain_task, p5_task):
        storage.task_priority = task.priority
        producer.add_schedule(task)
    storage.deferring = False
    storage.task_priority = 6
    storage.add_to_schedule(producer.serialize_task(record.s('body')), due)
    storage.task_priority = None
    members = conn.zrange(storage.schedule_key, 0, -1)
    assert sorted(message_priority(m) for m in members) == [0, 0, 5]
    # Huey's readers of the schedule get Huey's messages.
    assert sorted(t.args[0] for t in producer.scheduled()) == \
        ['body', 'p5', 'plain']
    # One priority-5 message was waiting already: the due one goes after.
    record('p5-waiting', priority=5)
    conn.set(keys.scheduler_lease, 'me')
    mover = DelayedMover(conn, storage, keys.scheduler_lease)
    moved = mover.move_batch('me', 2000)
    assert len(moved) == 3
    assert {producer.deserialize_task(m).id for m in moved} >= {
        plain_task.id, p5_task.id}
    order = [producer.deserialize_task(m).args[0]
             for m in producer.storage.enqueued_items()]
    assert order[:2] == ['p5-waiting', 'p5']
    assert sorted(order[2:]) == ['body', 'plain']
    assert all(message_data(m) == m for m in moved)


# -- a real consumer ----------------------------------------------------------

def env_for(base_env, **extra):
    env = dict(base_env, HUEY_MODULES='sample_tasks,test_priority',
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.5',
               HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='60')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def order(conn):
    return [t.decode() for t in conn.lrange(ORDER, 0, -1)]


def test_a_consumer_runs_tasks_in_priority_order(producer, base_env,
                                                 start_daemon, tmp_path):
    conn = producer.storage.conn
    results = [
        record('plain-1'),
        urgent('urgent-1'),                      # @huey.task(priority=10)
        record('p3-a', priority=3),              # per call
        producer.enqueue(record.s('p20', priority=20)),   # huey.enqueue
        record('neg', priority=-1),
        record('plain-2'),
        urgent('urgent-2'),
        record('p3-b', priority=3),
    ]
    assert producer.pending_count() == 8
    # What operators read counts them too (the marker not among them).
    from huey_worker import overview
    assert overview.snapshot(producer, producer.storage,
                             counts=True)['pending'] == 8
    status = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'status', '--json'],
        env=env_for(base_env), capture_output=True, text=True, timeout=60)
    assert '"pending": 8' in status.stdout, status.stdout
    daemon = start_daemon(['consumer', '--workers', '1'], env_for(base_env))
    for result in results:
        result.get(blocking=True, timeout=30)
    assert order(conn) == ['p20', 'urgent-1', 'urgent-2', 'p3-a', 'p3-b',
                           'plain-1', 'plain-2', 'neg']
    assert producer.pending_count() == 0

    # While the worker runs a plain task, plain ones and a priority one
    # arrive: the priority one runs next.  Then, the queue empty and the
    # worker blocked on the list (for read_timeout, 5 s here), a priority
    # task is taken at once.
    conn.delete(ORDER)
    gate = str(tmp_path / 'gate')
    first = wait_for_gate('running', gate)
    wait_until(lambda: order(conn) == ['running'], what='the gate task')
    later = [record('plain-a'), record('plain-b'), record('p1', priority=1)]
    open(gate, 'w').close()
    for result in [first] + later:
        result.get(blocking=True, timeout=30)
    assert order(conn) == ['running', 'p1', 'plain-a', 'plain-b']
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    daemon = start_daemon(['consumer', '--workers', '1'], env_for(
        base_env, HUEY_WORKER_CONSUMER_READ_TIMEOUT=5))
    daemon.wait_for_output('consumer ready')
    time.sleep(0.5)
    started = time.monotonic()
    assert urgent('idle').get(blocking=True, timeout=10) == 'idle'
    assert time.monotonic() - started < 2.5
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_killed_consumer_task_runs_again_with_its_priority(
        producer, base_env, start_daemon, tmp_path):
    conn, storage = producer.storage.conn, producer.storage
    gate = str(tmp_path / 'gate')
    env = env_for(base_env)
    first = start_daemon(['consumer', '--workers', '1'], env)
    first.wait_for_output('consumer ready')
    result = held('held', gate)                      # priority 7
    wait_until(lambda: order(conn) == ['held:1'], what='the task running')
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Nothing is lost while no consumer runs: it is in flight.
    assert storage.queue_size() == 0
    from huey_worker.storage import message_priority
    inflight = [m for key in conn.smembers(producer.keys.consumer_lists(
        conn.zrange(producer.keys.consumers, 0, 0)[0].decode()))
        for m in conn.lrange(key, 0, -1)]
    assert [message_priority(m) for m in inflight] == [7]
    others = [record('plain-1'), record('p3', priority=3),
              record('p9', priority=9), record('plain-2')]
    open(gate, 'w').close()
    second = start_daemon(['consumer', '--workers', '1'], env)
    second.wait_for_output('1 task(s) left in flight by the previous run')
    assert result.get(blocking=True, timeout=30) == 'held'
    for other in others:
        other.get(blocking=True, timeout=30)
    # Back in the queue with priority 7: after 9, before 3 and the plain.
    assert order(conn) == ['held:1', 'p9', 'held:2', 'p3', 'plain-1',
                           'plain-2']
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_a_retried_task_keeps_its_priority(producer, base_env, start_daemon,
                                           tmp_path):
    from huey_worker.storage import message_priority
    conn, storage = producer.storage.conn, producer.storage
    env = env_for(base_env)
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    result = fail_first('retried', str(tmp_path / 'failed-once'))  # p5
    wait_until(lambda: conn.zcard(storage.schedule_key) == 1,
               what='the retry in the schedule')
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    (member,) = conn.zrange(storage.schedule_key, 0, -1)
    assert message_priority(member) == 5
    plain = record('plain')
    scheduler = start_daemon(['scheduler'], env, 'scheduler')
    wait_until(lambda: conn.zcard(storage.schedule_key) == 0, 30,
               what='the retry moved into the queue')
    assert storage.queue_size() == 2
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    plain.get(blocking=True, timeout=30)
    # (Huey stored the first attempt's error as its result meanwhile.)
    wait_until(lambda: len(order(conn)) == 2, what='both tasks run')
    assert order(conn) == ['retried', 'plain']
    from huey_worker import journal
    assert journal.read_task(producer, storage, result.id)['state'] == \
        'complete'
    for daemon in (consumer, scheduler):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


def test_no_priority_task_lost_under_kill_9(producer, base_env,
                                           start_daemon):
    """tests/test_chaos.py in small, with priorities: workers and whole
    consumers killed again and again while tasks of mixed priorities run;
    every one completes, and the set and its marker are gone at the end."""
    import random
    import delivery_tasks
    from test_chaos import consumer_info, in_flight
    rng = random.Random(14)
    conn, storage = producer.storage.conn, producer.storage
    env = env_for(base_env, HUEY_MODULES='sample_tasks,delivery_tasks',
                  HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='3',
                  HUEY_WORKER_DELIVERY_MAX_DELIVERIES='50',
                  HUEY_WORKER_LOGGING_TASK_EVENTS='none')
    specs = {'prio-thread': ['--workers', '3', '--worker-type', 'thread'],
             'prio-proc': ['--workers', '2', '--worker-type', 'process']}
    running = {}

    def start(identity):
        running[identity] = start_daemon(
            ['consumer'] + specs[identity],
            dict(env, HUEY_CONSUMER_ID=identity), name=identity)

    count = 300
    ids = [delivery_tasks.chaos_unit(i, priority=rng.choice(
        [None, -1, 1, 5])).id for i in range(count)]
    assert storage.queue_size() == count
    for identity in specs:
        start(identity)

    def done():
        return sum(1 for v in conn.mget([storage.result_key(i)
                                         for i in ids]) if v)
    kills, exposed, step = 0, 0, 0
    deadline = time.monotonic() + 180
    while done() < count:
        assert time.monotonic() < deadline, (done(), storage.queue_size())
        time.sleep(0.5)
        if done() > count * 0.8:
            continue
        step += 1
        if step % 2:
            info = consumer_info(conn, 'prio-proc')
            pids = [w['pid'] for w in (info or {}).get('worker_list', [])
                    if w['pid'] and w['alive']]
            if pids:
                exposed += 1
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        else:
            identity = 'prio-thread' if step % 4 else 'prio-proc'
            exposed += in_flight(conn, identity) + int(specs[identity][1])
            os.killpg(running[identity].pid, signal.SIGKILL)
            running[identity].wait()
            kills += 1
            start(identity)             # comes back: requeues at once
    runs = {int(k): int(v) for k, v in conn.hgetall(
        'test:chaos-runs').items()}
    assert sorted(runs) == list(range(count))
    assert sum(n - 1 for n in runs.values()) <= exposed
    assert kills >= 6
    assert conn.llen(producer.keys.dead) == 0
    wait_until(lambda: not conn.exists(storage.queue_key,
                                       storage.priority_key),
               what='no marker nor set left')
    for daemon in running.values():
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
