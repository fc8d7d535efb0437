"""A stopping consumer starts nothing new (issue 13 §4).

Once a stop (SIGTERM) or a reload (SIGHUP) begins, no worker takes a
message: a queue read answered after that (an idle worker's blocking read,
or the read a worker sent with its last ack) puts its message back
unstarted, and the consumer puts back what is still in flight only once
every read is over.  Before, with `shutdown_timeout = 0`, a running task
put back by the stopping consumer was taken again at once by an idle
worker of that same consumer: two `start` lines, "2 task(s) put back" and
an extra delivery counted toward max_deliveries.

Real consumer processes, real signals, the session's private Redis; the
tasks live in a module of the test's own, as a user's would."""
import signal
import uuid

import pytest

from ops_helpers import task_record, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module

TASKS = '''
import time

from huey_worker import huey
from huey_worker.journal import current_delivery


@huey.task()
def long_task(tag, seconds, python_lines):
    """Note each delivery it sees, then work `seconds`: in one C call
    (time.sleep), or in Python lines an exception raised in the thread
    gets into."""
    huey.storage.conn.rpush('test:deliveries:' + tag, current_delivery())
    if python_lines:
        for _ in range(int(seconds * 100)):
            time.sleep(0.01)
    else:
        time.sleep(seconds)


@huey.task()
def quick(tag):
    huey.storage.conn.rpush('test:quick:' + tag, 'ran')
    return tag
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'stoptasks') as module:
        yield module


def long_task_running(base_env, start_daemon, tasks, worker_type,
                      python_lines):
    """A consumer of 4 `worker_type` workers with shutdown_timeout = 0,
    running one 30 s long_task (its body in one C call, or in Python lines
    with python_lines=True): (the consumer's env, the consumer, the task's
    tag, its result, its `start` log line), once the line is logged."""
    env = consumer_env(base_env, tasks, HUEY_WORKER_TYPE=worker_type,
                       HUEY_WORKERS=4,
                       HUEY_WORKER_CONSUMER_SHUTDOWN_TIMEOUT=0)
    consumer = ready_consumer(start_daemon, env)
    tag = uuid.uuid4().hex
    result = tasks.long_task(tag, 30, python_lines)
    start_line = 'start %s.long_task %s' % (tasks.name, result.id)
    consumer.wait_for_output(start_line)
    return env, consumer, tag, result, start_line


def deliveries_seen(producer, tag):
    return [int(x) for x in
            producer.storage.conn.lrange('test:deliveries:' + tag, 0, -1)]


def queued_ids(producer):
    return [producer.deserialize_task(m).id
            for m in producer.storage.enqueued_items()]


def delivery_count(producer, task_id):
    value = producer.storage.conn.hget(producer.storage.keys.deliveries,
                                       task_id)
    return None if value is None else int(value)


def in_flight(producer):
    conn = producer.storage.conn
    return sum(conn.llen(k) for k in
               conn.scan_iter(producer.storage.keys.prefix + 'inflight:*'))


@pytest.mark.slow
@pytest.mark.parametrize('worker_type,python_lines', [
    ('thread', False), ('thread', True), ('process', False)])
def test_sigterm_with_shutdown_timeout_0_starts_the_task_nowhere_again(
        base_env, start_daemon, producer, tasks, worker_type, python_lines):
    """The issue's reproduction: thread mode, shutdown_timeout = 0, one
    30 s task running, SIGTERM."""
    env, consumer, tag, result, start_line = long_task_running(
        base_env, start_daemon, tasks, worker_type, python_lines)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(60) == 0
    out = consumer.output()
    assert out.count(start_line) == 1, out
    assert 'task(s) put back' not in out or \
        '1 task(s) put back in the queue' in out, out
    assert '2 task(s) put back' not in out
    assert deliveries_seen(producer, tag) == [1]
    # Back in the queue once, counted once toward max_deliveries.
    assert queued_ids(producer) == [result.id]
    assert delivery_count(producer, result.id) == 1
    assert in_flight(producer) == 0
    assert task_record(producer, result.id)['state'] == 'pending'

    # The next start runs it as its second delivery, not its third.
    again = start_daemon(['consumer'], env, 'consumer-again')
    again.wait_for_output(start_line)
    assert wait_until(lambda: deliveries_seen(producer, tag) == [1, 2] or
                      len(deliveries_seen(producer, tag)) > 2,
                      what='the second delivery')
    assert deliveries_seen(producer, tag) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_a_reload_does_not_start_the_task_it_puts_back(
        base_env, start_daemon, producer, tasks, worker_type):
    env, consumer, tag, result, start_line = long_task_running(
        base_env, start_daemon, tasks, worker_type, False)
    consumer.signal(signal.SIGHUP)

    def run_again():
        # The re-executed image (same PID) takes it again: delivery 2.
        out = consumer.output()
        reloading = out.find('reloading: finishing running tasks')
        restarted = out.find(' starting: queue ', reloading) \
            if reloading >= 0 else -1
        if restarted >= 0 and start_line in out[restarted:]:
            return out, reloading, restarted
    out, reloading, restarted = wait_until(
        run_again, timeout=60, what='the task to start after the reload')
    # Between the drain and the new image's start nothing was started.
    assert start_line not in out[reloading:restarted], out
    assert out.count(start_line) == 2, out
    assert '2 task(s) put back' not in out
    wait_until(lambda: deliveries_seen(producer, tag)[-1:] == [2] or
               len(deliveries_seen(producer, tag)) > 2,
               what='the second delivery to run')
    assert deliveries_seen(producer, tag) == [1, 2]
    assert delivery_count(producer, result.id) == 2


def blocked_reads(redis_server):
    with redis_server.client() as client:
        return [c for c in client.client_list()
                if c.get('cmd') in ('brpoplpush', 'blmove', 'blpop')
                and 'b' in c.get('flags', '')]


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process', 'greenlet'])
@pytest.mark.parametrize('prefetched', [False, True],
                         ids=['idle-read', 'read-sent-with-the-ack'])
def test_a_message_a_stopping_worker_reads_is_put_back_unstarted(
        base_env, start_daemon, producer, tasks, redis_server, worker_type,
        prefetched):
    """The worker's queue read is outstanding when the stop begins (its
    idle blocking read, or the one it sent with the ack of its last
    task); a message enqueued then is taken by that read, and must go
    back to the queue, not run, not counted as a delivery."""
    env = consumer_env(base_env, tasks, HUEY_WORKER_TYPE=worker_type,
                       HUEY_WORKERS=1,
                       HUEY_WORKER_CONSUMER_READ_TIMEOUT=15,
                       HUEY_WORKER_REDIS_SOCKET_TIMEOUT=30,
                       HUEY_WORKER_CONSUMER_SHUTDOWN_TIMEOUT=30)
    consumer = ready_consumer(start_daemon, env)
    if prefetched:
        first = tasks.quick('first')
        consumer.wait_for_output('end %s.quick %s complete' % (tasks.name,
                                                               first.id))
    wait_until(lambda: blocked_reads(redis_server),
               what="the worker's blocking queue read")
    consumer.signal(signal.SIGTERM)
    consumer.wait_for_output('stopping: finishing running tasks')
    tag = uuid.uuid4().hex
    late = tasks.quick(tag)
    assert consumer.wait(60) == 0
    out = consumer.output()
    assert 'start %s.quick %s' % (tasks.name, late.id) not in out, out
    assert producer.storage.conn.lrange('test:quick:' + tag, 0, -1) == []
    assert queued_ids(producer) == [late.id]
    assert delivery_count(producer, late.id) is None
    assert in_flight(producer) == 0
    assert task_record(producer, late.id)['state'] == 'pending'
