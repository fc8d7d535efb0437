"""The worker's own writes (issue 13 §1): an outcome that cannot be stored
is the task's failure, once; and retries Huey schedules are spread with
jitter (issue 15).

Real consumer processes on the session's private Redis; the tasks live in
a module of the test's own, as a user's would."""
import datetime
import time

import pytest
from huey import MemoryHuey

from ops_helpers import wait_for_state, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module
from huey_worker import worker
from huey_worker.scheduler.periodic import naive_utc

TASKS = '''
import threading

from huey_worker import huey


@huey.task(retries=2, retry_delay=0)
def unpicklable(path):
    with open(path, 'a') as fh:
        fh.write('ran\\n')
    return {'lock': threading.RLock()}


@huey.task(retries=2, retry_delay=0)
def large(path, size):
    with open(path, 'a') as fh:
        fh.write('ran\\n')
    return 'r' * size


@huey.task()
def small():
    return 'small'


@huey.task(retries=1, retry_delay=1000, retry_backoff=2)
def fails(i):
    raise RuntimeError('fails on purpose')
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'mytasks') as module:
        yield module


def runs(path):
    return path.read_text().count('ran') if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_a_result_pickle_cannot_store_fails_the_task_once(
        tmp_path, base_env, start_daemon, producer, tasks, worker_type):
    consumer = ready_consumer(start_daemon, consumer_env(
        base_env, tasks, HUEY_WORKER_TYPE=worker_type, HUEY_WORKERS=1))
    marker = tmp_path / 'runs'
    result = tasks.unpicklable(str(marker))
    record = wait_for_state(producer, result.id, ('failed', 'complete',
                                                  'dead'), timeout=60)
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'TypeError'
    assert 'pickle' in record['error']['message']
    # The outcome is the task's own: the next one runs on the same worker.
    follow = tasks.small()
    assert wait_for_state(producer, follow.id, 'complete')
    assert runs(marker) == 1
    with pytest.raises(Exception) as failed:
        result.get()
    assert 'TypeError' in str(failed.value)
    assert producer.storage.conn.llen(producer.storage.keys.dead) == 0
    out = consumer.output()
    assert 'cannot be stored; the task fails (TypeError' in out
    assert 'poison' not in out and 'died' not in out


@pytest.mark.slow
def test_a_result_over_max_result_bytes_is_refused_before_redis(
        tmp_path, base_env, start_daemon, producer, tasks, redis_server):
    consumer = ready_consumer(start_daemon, consumer_env(
        base_env, tasks, HUEY_WORKERS=1,
        HUEY_WORKER_CONSUMER_MAX_RESULT_BYTES=1000))
    marker = tmp_path / 'runs'
    with redis_server.client() as watch:
        before = watch.info('stats')['total_net_input_bytes']
        result = tasks.large(str(marker), 500000)
        record = wait_for_state(producer, result.id, ('failed', 'complete'),
                                timeout=60)
        sent = watch.info('stats')['total_net_input_bytes'] - before
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'ResultTooLarge'
    assert 'max_result_bytes (1000)' in record['error']['message']
    assert runs(marker) == 1
    assert sent < 100000   # the result itself never went to Redis
    assert producer.storage.conn.get(producer.storage.result_key(
        result.id)) is not None   # the error is stored
    small = tasks.large(str(tmp_path / 'other'), 500)
    assert wait_for_state(producer, small.id, 'complete')
    assert small.get() == 'r' * 500


@pytest.mark.slow
def test_a_result_larger_than_redis_accepts_fails_and_frees_the_worker(
        tmp_path, base_env, start_daemon, producer, tasks, redis_server):
    """Redis closes the connection on a value over proto-max-bulk-len:
    not an outage, since it answers in between; the task fails."""
    admin = redis_server.client()
    default = admin.config_get('proto-max-bulk-len')['proto-max-bulk-len']
    admin.config_set('proto-max-bulk-len', '1mb')
    try:
        consumer = ready_consumer(start_daemon, consumer_env(
            base_env, tasks, HUEY_WORKERS=1,
            HUEY_WORKER_CONSUMER_MAX_RESULT_BYTES=0))
        marker = tmp_path / 'runs'
        result = tasks.large(str(marker), 2000000)
        record = wait_for_state(producer, result.id, ('failed', 'complete'),
                                timeout=60)
        assert record['state'] == 'failed', record
        assert record['error']['type'] == 'OutcomeRefused'
        assert 'Connection reset by peer' in record['error']['message'] or \
            'Broken pipe' in record['error']['message']
        assert runs(marker) == 1
        follow = tasks.small()
        assert wait_for_state(producer, follow.id, 'complete')
        inflight = [k for k in admin.keys('*inflight*')
                    if admin.type(k) == b'list']
        assert all(admin.llen(k) == 0 for k in inflight)
        out = consumer.output()
        assert 'Redis unreachable' not in out, out
    finally:
        admin.config_set('proto-max-bulk-len', default)
        admin.close()


# -- retries: jitter -----------------------------------------------------------

def test_retry_delays_are_drawn_up_to_the_growing_ceiling():
    """Each retry's delay is uniform in [d/2, d], d = retry_delay *
    backoff**n; d itself grows as Huey's does, undisturbed by the draws."""
    app = MemoryHuey(utc=True)

    @app.task(retries=2, retry_delay=100, retry_backoff=3)
    def job():
        pass
    worker.install_retry_jitter(app)
    now = datetime.datetime(2030, 1, 1)
    firsts, seconds = [], []
    for _ in range(400):
        task = job.s()
        app._requeue_task(task, now)
        firsts.append((task.eta - now).total_seconds())
        assert task.retry_delay == 300 and task.retries == 1
        app._requeue_task(task, now)
        seconds.append((task.eta - now).total_seconds())
        assert task.retry_delay == 900 and task.retries == 0
    for draws, ceiling in ((firsts, 100), (seconds, 300)):
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        lower_half = sum(d < ceiling * 0.75 for d in draws) / len(draws)
        assert 0.35 < lower_half < 0.65, lower_half
        assert min(draws) < ceiling * 0.55 and max(draws) > ceiling * 0.95
    # A delay the task asks for itself is not drawn.
    task = job.s()
    app._requeue_task(task, now, now + datetime.timedelta(seconds=7))
    assert (task.eta - now).total_seconds() == 7


@pytest.mark.slow
def test_tasks_failing_together_retry_spread_out(
        base_env, start_daemon, producer, tasks):
    count = 200
    results = [tasks.fails(i) for i in range(count)]
    consumer = ready_consumer(start_daemon, consumer_env(
        base_env, tasks, HUEY_WORKERS=4))
    storage = producer.storage
    wait_until(lambda: storage.conn.zcard(storage.schedule_key) == count,
               timeout=120, what='every task scheduled for its retry')
    now = storage.convert_ts(naive_utc(time.time()))
    delays = [score - now for _, score in storage.conn.zrange(
        storage.schedule_key, 0, -1, withscores=True)]
    # The runs took seconds; the retry_delay is 1000 s.
    assert all(380 < d <= 1000 for d in delays)
    lower_half = sum(d < 750 for d in delays) / count
    assert 0.3 < lower_half < 0.7, lower_half
    assert min(delays) < 625 and max(delays) > 875
    assert len(results) == count
