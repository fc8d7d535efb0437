"""Time limits in thread mode (issue 13 §6).

A task over its time limit on a thread worker gets TaskTimeout raised in
its thread and ends `failed` with TaskTimeout in the journal, as on a
process worker.  One stuck where no exception gets in (a C call, a
blocking read) is abandoned `[consumer] timeout_grace` later: it fails
with TaskTimeout, a new thread takes its worker slot, and nothing the
abandoned body does afterwards is recorded.  Before, such a task ran to
its end with no warning, holding its worker all along.

Real consumer processes on the session's private Redis; the tasks live in
a module of the test's own, as a user's would."""
import os

import pytest

from ops_helpers import history_states, task_record, wait_for_state
from task_module_helpers import consumer_env, ready_consumer, task_module

TASKS = '''
import time

from huey_worker import huey


@huey.task(timeout=2)
def python_lines(path):
    """6 s of Python lines: an exception raised in its thread gets in."""
    for _ in range(600):
        time.sleep(0.01)
    with open(path, 'w') as fh:
        fh.write('finished')


@huey.task()
def python_lines_default_limit(path):
    """As python_lines, limited by [tasks] timeout (HUEY_TASK_TIMEOUT)."""
    for _ in range(600):
        time.sleep(0.01)
    with open(path, 'w') as fh:
        fh.write('finished')


@huey.task(timeout=2, retries=2)
def stuck(fifo, path):
    """Blocks in one system call (opening a FIFO nobody writes to) until
    the test opens it; then swallows whatever was raised in it and
    returns, as a careless task would."""
    try:
        with open(fifo, 'rb') as fh:
            fh.read(1)
    except BaseException as exc:
        caught = repr(exc)
    else:
        caught = 'nothing'
    with open(path, 'w') as fh:
        fh.write(caught)
    return 'late result'


@huey.task()
def quick():
    return 'quick'
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'limittasks') as module:
        yield module


def thread_consumer(start_daemon, base_env, tasks, worker_type='thread',
                    **extra):
    """A ready consumer of one `worker_type` worker; `extra` as
    consumer_env's."""
    return ready_consumer(start_daemon, consumer_env(
        base_env, tasks, HUEY_WORKER_TYPE=worker_type, HUEY_WORKERS=1,
        **extra))


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'greenlet'])
@pytest.mark.parametrize('own_limit', [True, False],
                         ids=['timeout=2', 'HUEY_TASK_TIMEOUT=2'])
def test_a_task_in_python_lines_over_its_limit_ends_timeout(
        tmp_path, base_env, start_daemon, producer, tasks, own_limit,
        worker_type):
    """Seed 000's case: HUEY_TASK_TIMEOUT on thread workers (greenlet
    workers: gevent.Timeout, where the task yields to gevent)."""
    consumer = thread_consumer(start_daemon, base_env, tasks, worker_type,
                               HUEY_TASK_TIMEOUT=2)
    marker = tmp_path / 'finished'
    task = tasks.python_lines if own_limit else \
        tasks.python_lines_default_limit
    result = task(str(marker))
    record = wait_for_state(producer, result.id, ('failed', 'complete'),
                            timeout=60)
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'TaskTimeout'
    assert not marker.exists()
    out = consumer.output()
    if worker_type == 'thread':
        assert 'is over its time limit (2s): TaskTimeout raised in its ' \
            'thread' in out
    assert 'abandoned' not in out
    # The worker itself goes on.
    follow = tasks.quick()
    assert wait_for_state(producer, follow.id, 'complete')
    assert 'restarting it' not in consumer.output()


@pytest.mark.slow
def test_a_task_stuck_in_a_call_is_abandoned_and_its_worker_replaced(
        tmp_path, base_env, start_daemon, producer, tasks):
    consumer = thread_consumer(start_daemon, base_env, tasks,
                               HUEY_WORKER_CONSUMER_TIMEOUT_GRACE=1)
    fifo, marker = tmp_path / 'fifo', tmp_path / 'woke'
    os.mkfifo(fifo)
    result = tasks.stuck(str(fifo), str(marker))
    record = wait_for_state(producer, result.id, ('failed', 'complete',
                                                  'retrying'), timeout=60)
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'TaskTimeout'
    assert 'abandoned' in record['error']['message']
    # Not retried, whatever its retries: the body may still be running.
    assert record['retries_left'] == 0
    out = consumer.output()
    assert 'TaskTimeout raised in its thread' in out
    assert 'abandoned: it fails with TaskTimeout and a new worker takes ' \
        'the slot' in out
    # The only worker's slot runs other tasks while the body is stuck.
    follow = tasks.quick()
    assert wait_for_state(producer, follow.id, 'complete')
    assert not marker.exists()
    storage = producer.storage
    assert storage.conn.hget(storage.keys.deliveries, result.id) is None

    # Unblock the abandoned body: the TaskTimeout waiting in its thread
    # goes off, the body swallows it and returns; none of it is written.
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b'x')
    except BrokenPipeError:
        pass   # the body let go of the FIFO as soon as its open() returned
    finally:
        os.close(writer)
    consumer.wait_for_output('(abandoned): %s.stuck %s ended after' % (
        tasks.name, result.id))
    assert 'TaskTimeout' in marker.read_text()
    later = task_record(producer, result.id)
    assert later['state'] == 'failed'
    assert later['error'] == record['error']
    assert history_states(later) == history_states(record)
    assert 'complete' not in history_states(later)
    with pytest.raises(Exception) as failed:
        result.get()
    assert 'TaskTimeout' in str(failed.value)
    assert storage.conn.hget(storage.keys.deliveries, result.id) is None
    assert storage.queue_size() == 0
    assert not any(storage.conn.llen(k) for k in storage.conn.scan_iter(
        storage.keys.prefix + 'inflight:*'))
    # And the worker slot is still there for more.
    last = tasks.quick()
    assert wait_for_state(producer, last.id, 'complete')
    assert 'restarting it' not in consumer.output()
