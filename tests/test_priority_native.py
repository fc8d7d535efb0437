"""Issue 14: an adopted PriorityRedisHuey keeps its own queue, Huey's
sorted set at huey.redis.NAME, so that its web app's plain producers go on
enqueueing into it unchanged; the suite's workers take from it in priority
order with the guarantees of the plain queue (the move into the in-flight
list is atomic; a message put back keeps its priority), and the journal
learns of a task waiting there.  Real Redis, a producer process that
imports only huey, real consumers killed with SIGKILL."""
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest
import redis
from huey.storage import PriorityRedisStorage

from ops_helpers import (Client, history_states, start_status_server,
                         wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the storage on its own ---------------------------------------------------

@pytest.fixture
def pool(redis_url):
    return redis.ConnectionPool.from_url(redis_url, protocol=2)


@pytest.fixture
def storage(pool):
    from huey_worker.storage import NativePriorityStorage
    return NativePriorityStorage('nat', connection_pool=pool)


@pytest.fixture
def plain(pool):
    """A plain PriorityRedisHuey producer's storage on the same queue."""
    return PriorityRedisStorage('nat', connection_pool=pool)


def take_all(storage, inflight='inflight'):
    from huey_worker.storage import message_data
    storage.pin_connection()
    out = []
    while True:
        raw = storage.dequeue_into(inflight, 1)
        if raw is None:
            if not storage.queue_size():
                return out
            continue
        assert storage.conn.lrange(inflight, 0, -1) == [raw]
        storage.conn.lrem(inflight, 1, raw)
        out.append(message_data(raw))


def test_plain_and_suite_producers_share_hueys_sorted_set(storage, plain):
    plain.enqueue(b'\x80plain-1')
    storage.enqueue(b'\x80p5-a', 5)
    plain.enqueue(b'\x80neg', -1)
    plain.enqueue(b'\x80p10', 10)
    storage.enqueue(b'\x80plain-2', 0)
    plain.enqueue(b'\x80p5-b', 5)
    storage.enqueue(b'\x80p2.5', 2.5)
    storage.enqueue(b'\x80plain-3')
    conn = storage.conn
    # Everything is in Huey's own form, where huey's consumer would look.
    assert conn.type('huey.redis.nat') == b'zset'
    assert conn.zcard('huey.redis.nat') == 8
    assert plain.queue_size() == 8
    expected = [b'\x80p10', b'\x80p5-a', b'\x80p5-b', b'\x80p2.5',
                b'\x80plain-1', b'\x80plain-2', b'\x80plain-3', b'\x80neg']
    assert storage.queue_size() == 8
    assert storage.enqueued_items() == expected
    assert take_all(storage) == expected
    assert storage.queue_size() == 0
    assert not conn.exists('huey.redis.nat', storage.queue_key,
                           storage.priority_key)


def test_the_best_message_wins_and_the_producers_view_stays_true(
        storage, plain):
    """Huey's set stays the producers' queue: each read takes one message
    from it (when it beats what the suite holds), so a plain producer's
    pending_count() is what still waits.  Later arrivals rank with the
    rest; a put-back message goes before those of its priority."""
    count = 250
    expected = []
    for i in range(count):
        priority = (i * 7) % 5       # 0..4, interleaved
        plain.enqueue(b'\x80m%04d' % i, priority or None)
        expected.append((-priority, i))
    storage.pin_connection()
    first = storage.dequeue_into('inflight', 1)
    assert plain.queue_size() == count - 1
    assert storage.queue_size() == count - 1
    storage.conn.lrem('inflight', 1, first)
    plain.enqueue(b'\x80late-9', 9)
    plain.enqueue(b'\x80late-4', 4)
    second = storage.dequeue_into('inflight', 1)
    # Its worker died: it goes back, ahead of the other priority 9s.
    from huey_worker.delivery import Delivery
    assert Delivery(storage).requeue_list('inflight', 'lost') == 1
    plain.enqueue(b'\x80late-9b', 9)
    from huey_worker.storage import message_data
    taken = [message_data(t) for t in [first] + take_all(storage)]
    assert message_data(second) == b'\x80late-9'
    expected.sort()
    want = [b'\x80m%04d' % i for _, i in expected]
    fours = [b'\x80m%04d' % i for p, i in expected if p == -4]
    assert taken[0] == want[0] == fours[0]
    assert taken[1:3] == [b'\x80late-9', b'\x80late-9b']
    assert taken[3:2 + len(fours)] == fours[1:]
    assert taken[2 + len(fours)] == b'\x80late-4'
    assert taken[3 + len(fours):] == want[len(fours):]
    assert len(taken) == count + 3
    assert plain.queue_size() == 0


def test_priorities_a_plain_producer_may_give_survive_a_retry(storage,
                                                              plain):
    """inf (Huey and Redis take it) and priorities beyond 14 digits: the
    message in flight says exactly what Huey's set said, and a retry
    schedules it with that priority instead of failing the task."""
    from huey_worker.storage import message_data, message_priority
    plain.enqueue(b'\x80big', 123456789012345678)
    plain.enqueue(b'\x80top', float('inf'))
    plain.enqueue(b'\x80bottom', float('-inf'))
    storage.pin_connection()
    got = [storage.dequeue_into('inflight', 1) for _ in range(3)]
    assert [message_data(m) for m in got] == [b'\x80top', b'\x80big',
                                              b'\x80bottom']
    assert [message_priority(m) for m in got] == [
        float("inf"), int(float(123456789012345678)), float("-inf")]
    # The worker retries the task it runs: Huey schedules its message.
    storage.deferring = True
    storage.task_priority = float('inf')
    try:
        storage.add_to_schedule(b'\x80top', datetime.datetime(2030, 1, 1))
        storage.enqueue(b'\x80top-again', float('inf'))
    finally:
        storage.deferring = False
        storage.flush()
    scheduled, = storage.conn.zrange(storage.schedule_key, 0, -1)
    assert message_priority(scheduled) == float('inf')
    assert message_data(scheduled) == b'\x80top'
    assert storage.dequeue_into('inflight', 1)[-9:] == b'top-again'
    with pytest.raises(ValueError):
        storage.enqueue(b'\x80new', float('inf'))   # a producer: refused


def blocked_reader(storage, timeout):
    """A worker's queue read (dequeue_into, `timeout` s) in a thread of its
    own, once Redis has it blocked: (the thread, the list its message goes
    into)."""
    got = []
    reader = threading.Thread(target=lambda: got.append(
        storage.dequeue_into('inflight', timeout)))
    reader.start()
    wait_until(lambda: storage.conn.execute_command(
        'CLIENT', 'LIST').count(b'cmd=blpop') == 1, what='a blocked read')
    return reader, got


def test_an_idle_reader_is_woken_by_a_suite_enqueue(storage):
    storage.WAKE_POLL = 30    # long: only the wake-up can end the wait
    reader, got = blocked_reader(storage, 30)
    from huey_worker.storage import NativePriorityStorage
    producer = NativePriorityStorage('nat', connection_pool=storage.pool)
    producer.enqueue(b'\x80now', 3)
    reader.join(20)
    assert not reader.is_alive()
    from huey_worker.storage import message_data
    assert [message_data(m) for m in got] == [b'\x80now']
    # The wake-up list is bounded and expires.
    for _ in range(100):
        producer.enqueue(b'\x80x')
    assert storage.conn.llen(storage.wake_key) <= 64
    assert 0 < storage.conn.ttl(storage.wake_key) <= 60


def test_an_idle_reader_finds_a_plain_producers_task_on_its_next_look(
        storage, plain):
    storage.WAKE_POLL = 1
    reader, got = blocked_reader(storage, 5)
    plain.enqueue(b'\x80quiet', 2)    # no wake-up from a plain producer
    reader.join(20)
    from huey_worker.storage import message_data
    assert [message_data(m) for m in got if m] == [b'\x80quiet']


def test_a_put_back_priority_message_keeps_its_place(storage, plain):
    from huey_worker.delivery import Delivery
    from huey_worker.storage import message_data
    for i in range(3):
        plain.enqueue(b'\x80p3-%d' % i, 3)
    storage.pin_connection()
    first = storage.dequeue_into('hw:nat:inflight:x:1:0', 1)
    assert message_data(first) == b'\x80p3-0'
    # The worker died: its in-flight list goes back to the queue.
    assert Delivery(storage).requeue_list('hw:nat:inflight:x:1:0',
                                          'lost') == 1
    assert take_all(storage) == [b'\x80p3-0', b'\x80p3-1', b'\x80p3-2']


def test_hueys_own_read_and_flush(storage, plain):
    plain.enqueue(b'\x80low')
    plain.enqueue(b'\x80high', 1)
    assert storage.dequeue() == b'\x80high'
    assert storage.dequeue() == b'\x80low'
    assert storage.dequeue() is None
    plain.enqueue(b'\x80gone', 4)
    storage.enqueue(b'\x80gone-too')
    storage.flush_queue()
    assert storage.queue_size() == 0


# -- a PriorityRedisHuey app under the suite -----------------------------------

WEBAPP_TASKS = '''
import os
import time

import redis
from huey import PriorityRedisHuey

huey = PriorityRedisHuey('prio', url=os.environ['HUEY_REDIS_URL'])
ORDER = 'test:native-order'


def _record(tag):
    redis.Redis.from_url(os.environ['HUEY_REDIS_URL']).rpush(ORDER, tag)
    return tag


@huey.task()
def record(tag):
    return _record(tag)


@huey.task(priority=10)
def urgent(tag):
    return _record(tag)


@huey.task(priority=6)
def held(tag, gate):
    _record(tag)
    while not os.path.exists(gate):
        time.sleep(0.02)
    return tag
'''

PRODUCER = '''
import json
import sys

import webapp_tasks

ids = []
for name, args, kwargs in json.loads(sys.argv[1]):
    ids.append(getattr(webapp_tasks, name)(*args, **kwargs).id)
print(json.dumps(ids))
leaked = sorted(m for m in sys.modules if m.split('.')[0] in (
    'huey_worker', 'daemon'))
assert not leaked, leaked
'''


@pytest.fixture
def webapp(tmp_path, base_env):
    code = tmp_path / ('webapp-%s' % uuid.uuid4().hex[:6])
    code.mkdir()
    (code / 'webapp_tasks.py').write_text(WEBAPP_TASKS)
    (code / 'producer.py').write_text(PRODUCER)
    env = {k: v for k, v in base_env.items() if k != 'HUEY_MODULES'}
    env = dict(env, HUEY_WORKER_HUEY_APP='webapp_tasks:huey',
               PYTHONPATH=os.pathsep.join([str(code), base_env['PYTHONPATH']]),
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3',
               HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='2')
    web_env = {k: v for k, v in base_env.items()
               if not k.startswith('HUEY_WORKER')}
    web_env['PYTHONPATH'] = str(code)

    def produce(*calls):
        run = subprocess.run(
            [sys.executable, str(code / 'producer.py'),
             json.dumps([list(c) for c in calls])],
            env=web_env, cwd=str(code), capture_output=True, text=True,
            timeout=60)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)
    return env, produce


def order(conn):
    return [t.decode() for t in conn.lrange('test:native-order', 0, -1)]


def test_a_priority_app_runs_in_priority_order_and_survives_kill_9(
        webapp, start_daemon, tmp_path):
    env, produce = webapp
    conn = redis.Redis.from_url(env['HUEY_REDIS_URL'])
    ids = produce(('record', ['plain-1'], {}), ('urgent', ['urgent-1'], {}),
                  ('record', ['p3'], {'priority': 3}),
                  ('record', ['neg'], {'priority': -2}),
                  ('record', ['plain-2'], {}))
    assert conn.type('huey.redis.prio') == b'zset'

    # Waiting in Huey's set with no consumer: the journal finds it.
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/tasks/%s' % ids[1])
    assert status == 200, body
    assert body['state'] == 'pending' and body['first_seen_in'] == 'queue'
    assert body['name'] == 'webapp_tasks.urgent'
    shown = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'status', '--json'], env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert '"pending": 5' in shown.stdout, shown.stdout + shown.stderr

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    wait_until(lambda: len(order(conn)) == 5, timeout=30, what='five runs')
    assert order(conn) == ['urgent-1', 'p3', 'plain-1', 'plain-2', 'neg']
    for task_id in ids:
        wait_until(lambda: client.get('/tasks/%s' % task_id)[1]['state'] ==
                   'complete', what='%s complete' % task_id)
    assert history_states(client.get('/tasks/%s' % ids[1])[1]) == [
        'pending', 'running', 'complete']

    # A priority task whose consumer is killed runs again, still ahead of
    # the plain ones, and its journal goes running -> pending -> running.
    conn.delete('test:native-order')
    gate = str(tmp_path / 'gate')
    held_id, = produce(('held', ['held', gate], {}))
    wait_until(lambda: order(conn) == ['held'], what='the held task runs')
    consumer.signal(signal.SIGKILL)
    consumer.wait()
    later = produce(('record', ['plain-a'], {}),
                    ('record', ['p1'], {'priority': 1}))
    open(gate, 'w').close()
    second = start_daemon(['consumer', '--workers', '1'], env, 'consumer2')
    wait_until(lambda: len(order(conn)) == 4, timeout=40,
               what='the recovered task and the later ones')
    assert order(conn) == ['held', 'held', 'p1', 'plain-a']
    wait_until(lambda: client.get('/tasks/%s' % held_id)[1]['state'] ==
               'complete', what='the recovered task completes')
    # Back in the queue, it was pending again until a worker took it.
    states = history_states(client.get('/tasks/%s' % held_id)[1])
    assert states == ['running', 'lost', 'pending', 'running',
                      'complete'], states
    for task_id in later:
        wait_until(lambda: client.get('/tasks/%s' % task_id)[1]['state'] ==
                   'complete', what='later tasks complete')
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    server.signal(signal.SIGTERM)


SUITE_PRODUCER = '''
import json

from huey_worker import huey
huey.storage   # [huey] app: the web app's PriorityRedisHuey is adopted here

import webapp_tasks

print(json.dumps([webapp_tasks.record('suite-plain').id,
                  webapp_tasks.record('suite-p4', priority=4).id]))
'''


def test_a_suite_producer_of_a_priority_app_fills_hueys_sorted_set(
        webapp, start_daemon, tmp_path):
    """Through huey_worker with the app adopted, a task without a priority
    goes into Huey's sorted set too (never the suite's list by the
    one-script enqueue), recorded pending; the consumer runs the
    priority one first."""
    env, produce = webapp
    conn = redis.Redis.from_url(env['HUEY_REDIS_URL'])
    code = env['PYTHONPATH'].split(os.pathsep)[0]
    script = os.path.join(code, 'suite_producer.py')
    with open(script, 'w') as f:
        f.write(SUITE_PRODUCER)
    run = subprocess.run([sys.executable, script], env=env, cwd=code,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ids = json.loads(run.stdout)
    assert conn.type('huey.redis.prio') == b'zset'
    assert conn.zcard('huey.redis.prio') == 2
    assert conn.llen('hw:prio:queue') == 0
    for task_id in ids:
        assert conn.hget('hw:prio:task:%s' % task_id, 'state') == b'pending'
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    wait_until(lambda: len(order(conn)) == 2, timeout=30, what='two runs')
    assert order(conn) == ['suite-p4', 'suite-plain']
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_the_suites_own_app_on_a_priority_apps_queue_is_a_config_error(
        base_env, start_daemon, plain):
    """WRONGTYPE on every read is no outage: the consumer, the scheduler
    and the CLI refuse to start (78) and say to adopt the app."""
    plain.enqueue(b'\x80x', 3)     # huey.redis.nat is now a sorted set
    env = dict(base_env, HUEY_QUEUE_NAME='nat')
    for args in (['status'], ['submit', 'sample_tasks.add', '1', '2'],
                 ['consumer', '--workers', '1'], ['scheduler']):
        done = subprocess.run([sys.executable, '-m', 'huey_worker'] + args,
                              env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 78, (args, done.stdout, done.stderr)
        out = done.stdout + done.stderr
        assert "'huey.redis.nat', which is a zset, not a list" in out, out
        assert '[huey] app = MODULE:ATTRIBUTE' in out, out
        assert 'env HUEY_QUEUE_NAME' in out, out
    assert plain.queue_size() == 1


def test_a_drained_priority_apps_queue_is_still_refused_to_others(
        base_env, storage, plain):
    """Redis deletes an empty sorted set; the adopted app's consumers and
    CLI leave a mark, so a command run without [huey] app does not write
    a list where the producers' sorted set goes."""
    plain.enqueue(b'\x80x', 3)
    storage.check_queue_key()              # what a consumer does at start
    assert storage.conn.get('hw:nat:layout') == b'priority-redis-huey'
    storage.conn.delete(storage.native_key)    # drained
    env = dict(base_env, HUEY_QUEUE_NAME='nat')
    done = subprocess.run([sys.executable, '-m', 'huey_worker', 'submit',
                           'sample_tasks.add', '1', '2'], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "is a PriorityRedisHuey app's (hw:nat:layout" in done.stderr
    assert not storage.conn.exists('huey.redis.nat')   # nothing written
