"""Task locks (`@huey.lock_task(...)`) held by a worker that dies: the
redelivered task runs, and the lock is free again once the dead holder's
task is back in the queue; `[consumer] flush_locks` as huey_consumer's.

The first tests drive the pieces the worker and the consumer's recovery
call, in the orders a race can produce, on the real Redis; the last ones
kill real worker processes and consumers."""
import json
import os
import signal

import pytest
from huey.exceptions import TaskLockedException

from ops_helpers import delivery_env, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module
from worker_steps_helpers import WORKER, Delivery, in_consumer_thread, \
    inflight_key, requeue

from huey_worker import delivery, hooks, locks
from huey_worker.storage import message_data


@pytest.fixture
def locked_task(producer):
    """A task that takes the lock 'unit' (declared at import, as with the
    decorator) and the lock's Huey key in Redis."""
    lock = producer.lock_task('unit')

    @producer.task(name='locked')
    def locked():
        with lock:
            return 'ran'
    key = producer.storage.result_key('%s.lock.unit' % producer.name)
    key = key.decode() if isinstance(key, bytes) else key
    yield locked, lock, key
    producer._registry.unregister(locked.task_class)


def enqueued(app, task_wrapper):
    result = task_wrapper()
    raw = app.storage.conn.lindex(app.storage.queue_key, 0)
    assert app.deserialize_task(raw).id == result.id
    return raw


def delivered(app, raw, worker):
    """A delivery of `raw` by worker number `worker`, taken and started."""
    return Delivery(app, raw, inflight_key(app, worker)).take().start()


def dead_inside_lock(app, locked, lock):
    """A delivery of the task `locked` by worker 0 that took `lock` and was
    killed inside it (no release, no outcome, no ack); (raw message, the
    delivery)."""
    raw = enqueued(app, locked)
    dead = delivered(app, raw, 0)
    lock.acquire()
    dead.die()
    return raw, dead


def owner_index(app):
    return {k.decode(): json.loads(v) for k, v in
            app.storage.conn.hgetall(locks.index_key(app.storage)).items()}


def test_a_lock_taken_in_a_task_carries_its_owner(producer, locked_task):
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    first = delivered(producer, raw, 0)
    lock.acquire()
    owner = json.loads(producer.storage.conn.get(key))
    assert owner['task'] == first.task.id
    assert owner['name'] == 'test_task_locks.locked'
    assert (owner['host'], owner['pid'], owner['worker']) == (
        'test-host', 4242, 0)
    assert owner_index(producer) == {key: owner}
    # Huey's semantics stand: the same delivery cannot take it twice...
    with pytest.raises(TaskLockedException):
        lock.acquire()
    assert producer.is_locked('unit')
    # ...and leaving the lock frees the key and its owner entry together.
    lock.release()
    assert producer.storage.conn.exists(key) == 0
    assert owner_index(producer) == {}
    first.finish()


def test_a_lock_taken_outside_a_worker_is_a_plain_huey_lock(producer,
                                                            locked_task):
    _, lock, key = locked_task
    with lock:
        assert producer.storage.conn.exists(key) == 1
        assert owner_index(producer) == {}
    assert producer.storage.conn.exists(key) == 0


def test_requeue_of_a_dead_workers_task_releases_its_locks(producer,
                                                            locked_task):
    """The issue's case: the worker dies inside the lock; the consumer puts
    its message back and the lock goes with it, so the redelivered task
    runs."""
    locked, lock, key = locked_task
    raw, dead = dead_inside_lock(producer, locked, lock)
    assert producer.storage.conn.ttl(key) == -1

    # No one else gets it while its holder may still run.
    other = delivered(producer, enqueued(producer, locked), 1)
    with pytest.raises(TaskLockedException):
        lock.acquire()
    other.finish('failed')

    # The consumer finds the worker dead and puts the message back.
    assert requeue(producer, dead.inflight) == 1
    assert producer.storage.conn.exists(key) == 0
    assert owner_index(producer) == {}

    again = delivered(producer, raw, 2)
    lock.acquire()          # the redelivered run takes it
    lock.release()
    again.finish()


def test_a_redelivery_faster_than_the_requeue_hook_takes_the_lock_over(
        producer, locked_task):
    """The message is back in the queue and a worker runs it before the
    consumer's hook releases the dead delivery's locks: the new delivery
    takes the lock over (one worker runs a task id at a time), and the
    late hook leaves the new holder alone."""
    locked, lock, key = locked_task
    raw, dead = dead_inside_lock(producer, locked, lock)
    storage = producer.storage
    dead_owner = json.loads(storage.conn.get(key))

    # The consumer's move, its hooks not called yet.
    assert requeue(producer, dead.inflight, with_hooks=False) == 1
    again = delivered(producer, raw, 1)
    lock.acquire()          # taken over from the dead delivery
    token = storage.conn.get(key)
    owner = json.loads(token)
    assert owner['task'] == dead_owner['task'] == again.task.id
    assert owner['delivery'] != dead_owner['delivery']
    assert owner_index(producer) == {key: owner}

    # Now the late hook: the message no longer waits, so nothing goes.
    in_consumer_thread(hooks.call, hooks.on_requeued, storage,
                       [message_data(raw)], 'lost')
    assert storage.conn.get(key) == token
    lock.release()
    again.finish()
    assert storage.conn.exists(key) == 0 and owner_index(producer) == {}


def test_a_redelivery_that_skips_the_lock_frees_the_dead_ones(producer,
                                                               locked_task):
    """The redelivered run ends without entering the lock (the body took
    another branch): what the dead delivery held is freed at its end."""
    locked, lock, key = locked_task
    raw, dead = dead_inside_lock(producer, locked, lock)
    storage = producer.storage
    assert requeue(producer, dead.inflight, with_hooks=False) == 1
    again = delivered(producer, raw, 1)
    assert storage.conn.exists(key) == 1
    again.finish()
    assert storage.conn.exists(key) == 0 and owner_index(producer) == {}


def test_a_lock_a_task_keeps_on_purpose_stays(producer, locked_task):
    """A delivery that ends holding a lock it took (acquire without
    release) leaves it as Huey would: held, no longer tracked."""
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    run = delivered(producer, raw, 0)
    lock.acquire()
    run.finish()
    assert producer.storage.conn.exists(key) == 1
    assert owner_index(producer) == {}
    lock.release()


def test_a_poison_message_releases_its_locks(producer, locked_task):
    locked, lock, key = locked_task
    raw, dead = dead_inside_lock(producer, locked, lock)
    storage = producer.storage
    record = delivery.dead_letter_record(raw, 'poison', 'test', dead.task,
                                         WORKER, 'test_task_locks.locked')
    delivery.stage_dead_letter(storage, raw, record, dead.inflight)
    storage.flush()
    assert storage.conn.exists(key) == 0 and owner_index(producer) == {}


# -- with real processes ------------------------------------------------------

TASKS = '''
import os
import signal
import time

from huey_worker import huey
from huey_worker.journal import current_delivery


@huey.task()
@huey.lock_task('report')
def report(tag):
    huey.storage.conn.rpush('test:report-runs', tag)
    if current_delivery() == 1 and tag == 'die':
        os.kill(os.getpid(), signal.SIGKILL)
    return current_delivery()


@huey.task()
@huey.lock_task('report')
def hold(path):
    while not os.path.exists(path):
        time.sleep(0.05)
'''


@pytest.fixture
def lock_tasks(producer, tmp_path):
    with task_module(producer, tmp_path, TASKS, 'locktasks') as module:
        yield module


def lock_env(base_env, tasks, **extra):
    """A consumer of the lock tasks alone, with delivery_env's quick
    heartbeat and recovery."""
    return consumer_env(delivery_env(base_env), tasks, **extra)


@pytest.mark.slow
def test_task_of_a_killed_worker_runs_again_with_its_lock(
        producer, lock_tasks, base_env, start_daemon):
    """The issue's report: the worker is SIGKILLed inside the lock on the
    first delivery; the redelivered run and later runs go through."""
    daemon = ready_consumer(start_daemon, lock_env(base_env, lock_tasks),
                            ['--workers', '1', '--worker-type', 'process'])
    result = lock_tasks.report('die')
    assert result.get(blocking=True, timeout=30) == 2
    key = producer.storage.result_key('%s.lock.report' % producer.name)
    assert producer.storage.conn.exists(key) == 0
    assert lock_tasks.report('later').get(blocking=True, timeout=30) == 1
    assert producer.storage.conn.lrange('test:report-runs', 0, -1) == [
        b'die', b'die', b'later']
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.slow
def test_lock_of_a_killed_consumer_is_released_at_its_restart(
        producer, lock_tasks, base_env, start_daemon, tmp_path):
    """The whole consumer dies with the task inside the lock; the same
    consumer started again puts the task back, and it runs."""
    env = lock_env(base_env, lock_tasks)
    gate = tmp_path / 'gate'
    first = ready_consumer(start_daemon, env, ['--workers', '1'])
    key = producer.storage.result_key('%s.lock.report' % producer.name)
    # Killed while the task holds the lock, waiting for a file.
    lock_tasks.hold(str(gate))
    wait_until(lambda: producer.storage.conn.exists(key), 30,
               what='the task inside its lock')
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert producer.storage.conn.ttl(key) == -1
    gate.write_text('open')

    second = ready_consumer(start_daemon, env, ['--workers', '1'],
                            'consumer-again')
    wait_until(lambda: not producer.storage.conn.exists(key), 30,
               what='the lock released')
    assert lock_tasks.report('after').get(blocking=True, timeout=30) == 1
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


@pytest.mark.slow
def test_flush_locks_at_consumer_start(producer, lock_tasks, base_env,
                                       start_daemon):
    """A lock left by a release before owners were recorded (Huey's '1',
    no owner) goes only with [consumer] flush_locks, as with
    huey_consumer --flush-locks; extra_locks names more."""
    conn = producer.storage.conn
    report = producer.storage.result_key('%s.lock.report' % producer.name)
    other = producer.storage.result_key('%s.lock.other' % producer.name)
    conn.set(report, producer.serializer.serialize('1'))
    conn.set(other, producer.serializer.serialize('1'))
    env = lock_env(base_env, lock_tasks,
                   HUEY_WORKER_CONSUMER_FLUSH_LOCKS='true',
                   HUEY_WORKER_CONSUMER_EXTRA_LOCKS='other')
    daemon = ready_consumer(start_daemon, env, ['--workers', '1'])
    assert 'stale locks flushed at start ([consumer] flush_locks): other, ' \
        'report' in daemon.output()
    assert conn.exists(report, other) == 0
    assert lock_tasks.report('x').get(blocking=True, timeout=30) == 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    # As huey_consumer: --extra-locks alone flushes too.
    conn.set(report, producer.serializer.serialize('1'))
    conn.set(other, producer.serializer.serialize('1'))
    env.pop('HUEY_WORKER_CONSUMER_FLUSH_LOCKS')
    daemon = ready_consumer(start_daemon, env, ['--workers', '1'],
                            'consumer-again')
    assert conn.exists(report, other) == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
