"""The /metrics counters summed per process (daemon/journal/counters.py,
sent by a thread of each process every second and by a worker that
stops): every outcome counted exactly once, within a second or two,
whatever the workers do (a long task, a paused queue, an ack Redis
refuses, a recycle, a reload, SIGTERM), except a SIGKILLed process's
last second."""
import os
import signal
import time

import pytest

from ops_helpers import cli, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module

TASKS = '''
import os, time
from huey_worker import huey, check_cancelled

@huey.task()
def quick(i):
    return i

@huey.task()
def slow(seconds, value=1):
    time.sleep(seconds)
    return value

@huey.task()
def slow_big(seconds, size):
    time.sleep(seconds)
    return 'x' * size

@huey.task(retries=1, retry_delay=0)
def fail_first(i, marker_dir):
    path = os.path.join(marker_dir, 'f%d' % i)
    if not os.path.exists(path):
        open(path, 'w').close()
        raise RuntimeError('first attempt fails')
    return i

@huey.task()
def stubborn(gate):
    """Swallows the cancel: only SIGKILL ends it."""
    while not os.path.exists(gate):
        try:
            time.sleep(0.05)
        except BaseException:
            pass
    return 'released'

@huey.task()
def checking(gate):
    while not os.path.exists(gate):
        check_cancelled()
        time.sleep(0.02)
    return 'released'
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'ctasks') as module:
        module.env.update({'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
                           'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT': '3'})
        yield module


def env_of(base_env, tasks, **extra):
    return consumer_env(base_env, tasks, **extra)


def hash_ints(conn, key):
    return {k.decode(): int(v) for k, v in conn.hgetall(key).items()}


def counted(producer, name, state='complete'):
    keys = producer.storage.keys
    return hash_ints(producer.storage.conn, keys.metrics_outcomes).get(
        '%s.%s\t%s' % (producer_name(name), name, state), 0)


_module = {}


def producer_name(name):
    return _module['name']


def durations_count(producer, task):
    keys = producer.storage.keys
    d = hash_ints(producer.storage.conn, keys.metrics_durations)
    return sum(v for k, v in d.items()
               if k.startswith(task + '\t') and not k.endswith('sum_us'))


def held_total(producer):
    keys = producer.storage.keys
    return sum(hash_ints(producer.storage.conn, keys.journal_held).values())


def states(producer, ids):
    conn, keys = producer.storage.conn, producer.storage.keys
    pipe = conn.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(keys.task(task_id), 'state')
    return [s.decode() if s else None for s in pipe.execute()]


def n_in(producer, ids, state='complete'):
    return sum(1 for s in states(producer, ids) if s == state)


@pytest.fixture(autouse=True)
def _remember(tasks):
    _module['name'] = tasks.name


def enqueue_many(producer, fn, n, *args):
    return [fn(i, *args).id for i in range(n)]


def wait_all(producer, ids, state='complete', timeout=60):
    wait_until(lambda: n_in(producer, ids, state) == len(ids),
               timeout=timeout, what='%d tasks %s' % (len(ids), state))


def settle_exact(producer, name, expected, state='complete', timeout=8):
    """The count reaches `expected` within `timeout`, and does not go past
    it in the next 2.5 s."""
    wait_until(lambda: counted(producer, name, state) >= expected,
               timeout=timeout,
               what='%s %s counted %d (now %d)' % (
                   name, state, expected, counted(producer, name, state)))
    time.sleep(2.5)
    assert counted(producer, name, state) == expected


# -- bursts -------------------------------------------------------------------

@pytest.mark.parametrize('worker_type,workers', [('thread', 4),
                                                 ('process', 2)])
def test_burst_counts_exact_after_idle(base_env, start_daemon, producer,
                                       tasks, worker_type, workers):
    ready_consumer(start_daemon, env_of(base_env, tasks,
                                        HUEY_WORKER_TYPE=worker_type,
                                        HUEY_WORKERS=workers))
    ids = enqueue_many(producer, tasks.quick, 300)
    wait_all(producer, ids)
    settle_exact(producer, 'quick', 300)
    name = '%s.quick' % tasks.name
    assert durations_count(producer, name) == 300
    assert held_total(producer) == 300
    keys = producer.storage.keys
    conn = producer.storage.conn
    assert conn.ttl(keys.journal_held) > 0


def test_sigterm_right_after_burst_sends_everything(base_env, start_daemon,
                                                    producer, tasks):
    daemon = ready_consumer(start_daemon, env_of(
        base_env, tasks, HUEY_WORKER_TYPE='process', HUEY_WORKERS=2))
    ids = enqueue_many(producer, tasks.quick, 400)
    wait_until(lambda: n_in(producer, ids) >= 150, timeout=60)
    daemon.signal(signal.SIGTERM)
    daemon.wait(60)
    done = n_in(producer, ids)
    assert counted(producer, 'quick') == done
    assert held_total(producer) == done
    assert producer.storage.conn.ttl(producer.storage.keys.journal_held) > 0


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_recycled_workers_send_their_counts(base_env, start_daemon, producer,
                                            tasks, worker_type):
    ready_consumer(start_daemon, env_of(
        base_env, tasks, HUEY_WORKER_TYPE=worker_type, HUEY_WORKERS=2,
        HUEY_WORKER_CONSUMER_MAX_TASKS=7))
    ids = enqueue_many(producer, tasks.quick, 150)
    wait_all(producer, ids)
    settle_exact(producer, 'quick', 150)


def test_sighup_reload_right_after_burst(base_env, start_daemon, producer,
                                         tasks):
    daemon = ready_consumer(start_daemon, env_of(
        base_env, tasks, HUEY_WORKER_TYPE='process', HUEY_WORKERS=2))
    ids = enqueue_many(producer, tasks.quick, 300)
    wait_until(lambda: n_in(producer, ids) >= 100, timeout=60)
    daemon.signal(signal.SIGHUP)
    wait_all(producer, ids)
    settle_exact(producer, 'quick', 300)


def test_retrying_outcomes_counted(base_env, start_daemon, producer, tasks,
                                   tmp_path):
    ready_consumer(start_daemon, env_of(base_env, tasks,
                                        HUEY_WORKER_TYPE='process',
                                        HUEY_WORKERS=2))
    marker_dir = tmp_path / 'markers'
    marker_dir.mkdir()
    ids = enqueue_many(producer, tasks.fail_first, 60, str(marker_dir))
    wait_all(producer, ids)
    settle_exact(producer, 'fail_first', 60, 'retrying')
    assert counted(producer, 'fail_first') == 60


# -- lag promise: "counts lag by a second or two" ------------------------------

@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_counts_arrive_while_a_long_task_follows_a_burst(
        base_env, start_daemon, producer, tasks, worker_type):
    ready_consumer(start_daemon, env_of(base_env, tasks,
                                        HUEY_WORKER_TYPE=worker_type,
                                        HUEY_WORKERS=1))
    ids = enqueue_many(producer, tasks.quick, 40)
    long = tasks.slow(12)
    wait_all(producer, ids)
    wait_until(lambda: states(producer, [long.id])[0] == 'running')
    # "counts lag by a second or two" (docs/status-endpoint.md)
    wait_until(lambda: counted(producer, 'quick') == 40, timeout=5,
               what='40 quick counted (now %d)' % counted(producer, 'quick'))


def test_pause_right_after_burst_counts_arrive(base_env, start_daemon,
                                               producer, tasks):
    env = env_of(base_env, tasks, HUEY_WORKER_TYPE='thread', HUEY_WORKERS=1)
    ready_consumer(start_daemon, env)
    ids = [tasks.slow(0.03, i).id for i in range(150)]
    wait_until(lambda: n_in(producer, ids, 'complete') >= 20, timeout=30)
    assert cli(env, 'pause').returncode == 0
    # The worker stops taking tasks.
    last = [-1]

    def stable():
        now = n_in(producer, ids, 'complete')
        same, last[0] = now == last[0], now
        return same
    time.sleep(1.5)
    wait_until(stable, interval=1.0)
    done = last[0]
    assert done < 150
    wait_until(lambda: counted(producer, 'slow') == done, timeout=5,
               what='%d slow counted while paused (now %d)' % (
                   done, counted(producer, 'slow')))


# -- a SIGKILL (the daemon's own, on a cancel the task ignores) ----------------

def test_sigkilled_worker_loses_no_more_than_its_last_second(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks, HUEY_WORKER_TYPE='process', HUEY_WORKERS=1)
    daemon = ready_consumer(start_daemon, env)
    ids = enqueue_many(producer, tasks.quick, 40)
    gate = tmp_path / 'gate'
    held = tasks.stubborn(str(gate))
    wait_all(producer, ids)
    wait_until(lambda: states(producer, [held.id])[0] == 'running')
    time.sleep(3)   # the quick tasks ended > 3 s before the kill
    assert cli(env, 'cancel', held.id).returncode == 0
    daemon.wait_for_output('killing it', timeout=30)
    gate.touch()
    wait_until(lambda: states(producer, [held.id])[0] == 'canceled',
               timeout=30)
    time.sleep(3)
    assert counted(producer, 'quick') == 40


def test_cancelled_process_worker_keeps_earlier_counts(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks, HUEY_WORKER_TYPE='process', HUEY_WORKERS=1)
    ready_consumer(start_daemon, env)
    ids = enqueue_many(producer, tasks.quick, 40)
    gate = tmp_path / 'gate'
    held = tasks.checking(str(gate))
    wait_all(producer, ids)
    wait_until(lambda: states(producer, [held.id])[0] == 'running')
    assert cli(env, 'cancel', held.id).returncode == 0
    wait_until(lambda: states(producer, [held.id])[0] == 'canceled',
               timeout=30)
    settle_exact(producer, 'quick', 40)
    settle_exact(producer, 'checking', 1, 'canceled')


# -- an outcome Redis refuses --------------------------------------------------

def test_a_refused_outcome_does_not_drop_other_tasks_counts(
        base_env, start_daemon, producer, tasks, redis_server):
    admin = redis_server.client()
    default = admin.config_get('proto-max-bulk-len')['proto-max-bulk-len']
    admin.config_set('proto-max-bulk-len', '1mb')
    try:
        ready_consumer(start_daemon, env_of(
            base_env, tasks, HUEY_WORKER_TYPE='thread', HUEY_WORKERS=1,
            HUEY_WORKER_CONSUMER_MAX_RESULT_BYTES=0))
        ids = enqueue_many(producer, tasks.quick, 30)
        big = tasks.slow_big(1.5, 2000000)
        wait_all(producer, ids)
        wait_until(lambda: states(producer, [big.id])[0] == 'failed',
                   timeout=60)
        settle_exact(producer, 'slow_big', 1, 'failed')
        assert counted(producer, 'quick') == 30
    finally:
        admin.config_set('proto-max-bulk-len', default)
        admin.close()


# -- a send Redis does not answer: summed again, sent once ------------------

def test_counts_redis_did_not_answer_are_sent_once_later(producer,
                                                         redis_server):
    """The sender's transaction times out on a frozen Redis: the counts
    are summed again and go out with the next send, once (the frozen
    Redis never ran the transaction whose connection was dropped)."""
    from huey_worker.journal import counters
    storage = producer.storage
    pool = storage.conn.connection_pool
    pool.connection_kwargs['socket_timeout'] = 0.5
    pool.disconnect()
    key = storage.keys.metrics_outcomes
    counts = counters.Counters()
    counts.add_many(storage.conn, [(key, 'x\tcomplete', 5)])
    counts._sender = None   # this test sends by hand
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        assert counts.flush() == 0   # times out: kept for later
    finally:
        time.sleep(0.3)
        os.kill(redis_server.process.pid, signal.SIGCONT)
    pool.connection_kwargs['socket_timeout'] = 30
    pool.disconnect()
    assert counts   # kept for later
    assert counts.flush() == 1      # the later try
    time.sleep(0.2)
    assert int(storage.conn.hget(key, 'x\tcomplete')) == 5
