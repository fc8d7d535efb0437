"""Task locks (`@huey.lock_task(...)`) held by a worker that dies: the
redelivered task runs, and the lock is free again once the dead holder's
task is back in the queue; `[consumer] flush_locks` as huey_consumer's.

The first tests drive the pieces the worker and the consumer's recovery
call, in the orders a race can produce, on the real Redis; the last ones
kill real worker processes and consumers."""
import json
import os
import signal
import textwrap
import threading

import pytest
from huey.exceptions import TaskLockedException

from ops_helpers import delivery_env, wait_until

from huey_worker import context, delivery, hooks, locks
from huey_worker.storage import message_data

WORKER = {'host': 'test-host', 'pid': 4242, 'consumer': 'test:main',
          'worker': 0}


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


class Delivery:
    """One delivery of `message`, as a worker makes it: the message in an
    in-flight list of its own, the hooks and the first transaction before
    the body, the outcome and the ack after it."""

    def __init__(self, app, raw, inflight):
        self.app, self.raw, self.inflight = app, raw, inflight
        self.storage = app.storage
        self.task = app.deserialize_task(message_data(raw))

    def take(self):
        """The message moves from the queue into the in-flight list."""
        conn = self.storage.conn
        assert conn.lrem(self.storage.queue_key, 1, self.raw) == 1
        conn.lpush(self.inflight, self.raw)

    def start(self):
        storage, task = self.storage, self.task
        hooks.call(hooks.on_dequeued, storage, task, WORKER)
        # Last, as the worker sends them: the delivery count, and the read
        # of Huey's revocation keys.
        replies = storage.flush_all(
            ('HINCRBY', storage.keys.deliveries, task.id, 1),
            ('MGET', *[storage.result_key(k)
                       for k in self.app._revoke_keys(task)]))
        hooks.call(hooks.on_started, storage, task, replies)
        storage.flush()
        context.set_current(task, replies[-2], WORKER)
        return self

    def stop_running(self):
        context.clear_current()

    def finish(self, state='complete'):
        storage, task = self.storage, self.task
        context.clear_current()
        storage.stage_command('LREM', self.inflight, 1, self.raw)
        storage.stage_command('HDEL', storage.keys.deliveries, task.id)
        hooks.call(hooks.on_outcome, storage, task, state, 0.01)
        storage.flush()


def elsewhere(fn, *args):
    """Run `fn` in a thread of its own, as the consumer's main thread runs
    the recovery of a dead worker: no task context, nothing staged."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join(30)
    assert out, 'the recovery did not finish'
    return out[0]


def requeue(app, inflight, with_hooks=True):
    """The consumer putting a dead worker's message back."""
    def move():
        if with_hooks:
            return delivery.Delivery(app.storage).requeue_list(inflight,
                                                               'lost')
        held = list(hooks.on_requeued)
        hooks.on_requeued[:] = []
        try:
            return delivery.Delivery(app.storage).requeue_list(inflight,
                                                               'lost')
        finally:
            hooks.on_requeued[:] = held
    return elsewhere(move)


def enqueued(app, task_wrapper):
    result = task_wrapper()
    raw = app.storage.conn.lindex(app.storage.queue_key, 0)
    assert app.deserialize_task(raw).id == result.id
    return raw


def inflight_key(app, worker):
    return app.keys.inflight('test:main', worker, 'test')


def owner_index(app):
    return {k.decode(): json.loads(v) for k, v in
            app.storage.conn.hgetall(locks.index_key(app.storage)).items()}


def test_a_lock_taken_in_a_task_carries_its_owner(producer, locked_task):
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    first = Delivery(producer, raw, inflight_key(producer, 0))
    first.take()
    first.start()
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
    raw = enqueued(producer, locked)
    dead = Delivery(producer, raw, inflight_key(producer, 0))
    dead.take()
    dead.start()
    lock.acquire()
    dead.stop_running()     # killed: no release, no outcome, no ack
    assert producer.storage.conn.ttl(key) == -1

    # No one else gets it while its holder may still run.
    other = Delivery(producer, enqueued(producer, locked),
                     inflight_key(producer, 1))
    other.take()
    other.start()
    with pytest.raises(TaskLockedException):
        lock.acquire()
    other.finish('failed')

    # The consumer finds the worker dead and puts the message back.
    assert requeue(producer, dead.inflight) == 1
    assert producer.storage.conn.exists(key) == 0
    assert owner_index(producer) == {}

    again = Delivery(producer, raw, inflight_key(producer, 2))
    again.take()
    again.start()
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
    raw = enqueued(producer, locked)
    dead = Delivery(producer, raw, inflight_key(producer, 0))
    dead.take()
    dead.start()
    lock.acquire()
    dead.stop_running()
    storage = producer.storage
    dead_owner = json.loads(storage.conn.get(key))

    # The consumer's move, its hooks not called yet.
    assert requeue(producer, dead.inflight, with_hooks=False) == 1
    again = Delivery(producer, raw, inflight_key(producer, 1))
    again.take()
    again.start()
    lock.acquire()          # taken over from the dead delivery
    token = storage.conn.get(key)
    owner = json.loads(token)
    assert owner['task'] == dead_owner['task'] == again.task.id
    assert owner['delivery'] != dead_owner['delivery']
    assert owner_index(producer) == {key: owner}

    # Now the late hook: the message no longer waits, so nothing goes.
    elsewhere(hooks.call, hooks.on_requeued, storage, [message_data(raw)],
              'lost')
    assert storage.conn.get(key) == token
    lock.release()
    again.finish()
    assert storage.conn.exists(key) == 0 and owner_index(producer) == {}


def test_a_redelivery_that_skips_the_lock_frees_the_dead_ones(producer,
                                                               locked_task):
    """The redelivered run ends without entering the lock (the body took
    another branch): what the dead delivery held is freed at its end."""
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    dead = Delivery(producer, raw, inflight_key(producer, 0))
    dead.take()
    dead.start()
    lock.acquire()
    dead.stop_running()
    storage = producer.storage
    assert requeue(producer, dead.inflight, with_hooks=False) == 1
    again = Delivery(producer, raw, inflight_key(producer, 1))
    again.take()
    again.start()
    assert storage.conn.exists(key) == 1
    again.finish()
    assert storage.conn.exists(key) == 0 and owner_index(producer) == {}


def test_a_lock_a_task_keeps_on_purpose_stays(producer, locked_task):
    """A delivery that ends holding a lock it took (acquire without
    release) leaves it as Huey would: held, no longer tracked."""
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    run = Delivery(producer, raw, inflight_key(producer, 0))
    run.take()
    run.start()
    lock.acquire()
    run.finish()
    assert producer.storage.conn.exists(key) == 1
    assert owner_index(producer) == {}
    lock.release()


def test_a_poison_message_releases_its_locks(producer, locked_task):
    locked, lock, key = locked_task
    raw = enqueued(producer, locked)
    dead = Delivery(producer, raw, inflight_key(producer, 0))
    dead.take()
    dead.start()
    lock.acquire()
    dead.stop_running()
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
def lock_tasks(producer, tmp_path, monkeypatch):
    (tmp_path / 'mytasks.py').write_text(textwrap.dedent(TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop('mytasks', None)
    module = importlib.import_module('mytasks')
    yield module
    for task in (module.report, module.hold):
        producer._registry.unregister(task.task_class)
    sys.modules.pop('mytasks', None)


def lock_env(base_env, tmp_path, **extra):
    return delivery_env(base_env, HUEY_MODULES='mytasks',
                        HUEY_WORKER_TASKS_PYTHON_PATH=str(tmp_path), **extra)


@pytest.mark.slow
def test_task_of_a_killed_worker_runs_again_with_its_lock(
        producer, lock_tasks, base_env, start_daemon, tmp_path):
    """The issue's report: the worker is SIGKILLed inside the lock on the
    first delivery; the redelivered run and later runs go through."""
    daemon = start_daemon(['consumer', '--workers', '1', '--worker-type',
                           'process'], lock_env(base_env, tmp_path))
    daemon.wait_for_output('consumer ready')
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
    env = lock_env(base_env, tmp_path)
    gate = tmp_path / 'gate'
    first = start_daemon(['consumer', '--workers', '1'], env)
    first.wait_for_output('consumer ready')
    key = producer.storage.result_key('%s.lock.report' % producer.name)
    # Killed while the task holds the lock, waiting for a file.
    lock_tasks.hold(str(gate))
    wait_until(lambda: producer.storage.conn.exists(key), 30,
               what='the task inside its lock')
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert producer.storage.conn.ttl(key) == -1
    gate.write_text('open')

    second = start_daemon(['consumer', '--workers', '1'], env)
    second.wait_for_output('consumer ready')
    wait_until(lambda: not producer.storage.conn.exists(key), 30,
               what='the lock released')
    assert lock_tasks.report('after').get(blocking=True, timeout=30) == 1
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


@pytest.mark.slow
def test_flush_locks_at_consumer_start(producer, lock_tasks, base_env,
                                       start_daemon, tmp_path):
    """A lock left by a release before owners were recorded (Huey's '1',
    no owner) goes only with [consumer] flush_locks, as with
    huey_consumer --flush-locks; extra_locks names more."""
    conn = producer.storage.conn
    report = producer.storage.result_key('%s.lock.report' % producer.name)
    other = producer.storage.result_key('%s.lock.other' % producer.name)
    conn.set(report, producer.serializer.serialize('1'))
    conn.set(other, producer.serializer.serialize('1'))
    env = lock_env(base_env, tmp_path, HUEY_WORKER_CONSUMER_FLUSH_LOCKS='true',
                   HUEY_WORKER_CONSUMER_EXTRA_LOCKS='other')
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    daemon.wait_for_output('consumer ready')
    assert 'stale locks flushed at start ([consumer] flush_locks): other, ' \
        'report' in daemon.output()
    assert conn.exists(report, other) == 0
    assert lock_tasks.report('x').get(blocking=True, timeout=30) == 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
