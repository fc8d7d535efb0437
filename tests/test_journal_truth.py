"""The journal says only what happened, in the order it happened:

* an enqueue that fails leaves no record, and nothing it staged rides a
  later round trip of the thread;
* the loss of a delivery is in the history before the next delivery's
  events, whichever of the recovery and the redelivery writes first (the
  race driven step by step: the consumer's move, the new worker's run,
  then the consumer's late note), and the history is read in the order
  Redis took the events, never by the writers' clocks (but for the
  running and end of a delivery the record's fields tell, which go after
  the last event at or before their time);
* sys.exit() (or KeyboardInterrupt) inside a task fails that task with a
  clear error; the worker goes on.
"""
import json
import signal
import socket
import threading

import pytest
import redis

from ops_helpers import delivery_env, history_states, task_record, \
    wait_for_state, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module
from worker_steps_helpers import Delivery, in_consumer_thread, \
    inflight_key as inflight, requeue

from huey_worker import hooks
from huey_worker.storage import message_data

import sample_tasks


# -- failed enqueues -----------------------------------------------------------

def test_an_enqueue_that_cannot_pickle_leaves_no_record(producer):
    unpicklable = sample_tasks.add.s(threading.Lock(), 1)
    with pytest.raises(TypeError):
        producer.enqueue(unpicklable)
    assert task_record(producer, unpicklable.id) is None
    assert not producer.storage.has_pending()
    # The thread's next round trip carries nothing of it.
    fine = sample_tasks.add(1, 2)
    assert task_record(producer, fine.id)['state'] == 'pending'
    assert task_record(producer, unpicklable.id) is None
    conn = producer.storage.conn
    assert not conn.exists(producer.keys.task_log(unpicklable.id))
    assert conn.zscore(producer.keys.journal_recent, unpicklable.id) is None
    assert conn.llen(producer.storage.queue_key) == 1


def test_an_enqueue_redis_refused_leaves_no_record(producer):
    pool = producer.storage.pool
    port = pool.connection_kwargs['port']
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead = s.getsockname()[1]
    refused = sample_tasks.add.s(3, 4)
    # Redis unreachable for this one enqueue: its connection goes where
    # nothing listens (connections keep the address they were made with,
    # so the pool is emptied on either side; the producer's parked
    # connections, made with the pool's settings, are closed for good).
    producer.storage.disconnect()
    pool.reset()
    pool.connection_kwargs['port'] = dead
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            producer.enqueue(refused)
    finally:
        pool.connection_kwargs['port'] = port
        pool.disconnect()
        pool.reset()
    assert not producer.storage.has_pending()
    fine = sample_tasks.add(5, 6)
    assert task_record(producer, fine.id)['state'] == 'pending'
    assert task_record(producer, refused.id) is None
    assert producer.storage.conn.llen(producer.storage.queue_key) == 1


def test_an_enqueue_still_records_in_its_own_transaction(producer):
    """The record of a group's members and of a plain enqueue, as before:
    each member recorded, pending."""
    from huey.api import group
    results = producer.enqueue(group([sample_tasks.add.s(1, 1),
                                      sample_tasks.add.s(2, 2)]))
    for result in results:
        assert task_record(producer, result.id)['state'] == 'pending'
    assert not producer.storage.has_pending()


# -- the order of a history --------------------------------------------------------

def move_back(app, inflight):
    """The consumer's move of a dead worker's message, its hooks not
    called yet (they run right after it, in the same thread)."""
    assert requeue(app, inflight, with_hooks=False) == 1


def note_requeue(app, raw):
    """The consumer's hooks after the move: the journal's note."""
    in_consumer_thread(hooks.call, hooks.on_requeued, app.storage,
                       [message_data(raw)], 'lost')


def queued(app):
    result = sample_tasks.add(2, 3)
    return result.id, app.storage.conn.lindex(app.storage.queue_key, 0)


def test_a_late_requeue_note_does_not_follow_the_next_run(producer):
    """The issue's `... complete, lost`: the consumer puts the message of
    a dead worker back, a worker runs it to the end, and only then the
    consumer's note arrives.  The loss goes before the second run."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    move_back(producer, inflight(producer, 0))
    Delivery(producer, raw, inflight(producer, 1)).take().start().finish()
    note_requeue(producer, raw)
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'lost', 'running', 'complete']
    assert record['state'] == 'complete' and record['attempt'] == 2
    assert record['requeues'] == 1


def test_a_note_between_the_move_and_the_next_run(producer):
    """The note arrives before a worker took the message again (the usual
    order): lost, pending, then the run; the run adds no second lost."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    move_back(producer, inflight(producer, 0))
    note_requeue(producer, raw)
    assert task_record(producer, task_id)['state'] == 'pending'
    Delivery(producer, raw, inflight(producer, 1)).take().start().finish()
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'lost', 'pending', 'running', 'complete']
    assert record['state'] == 'complete'


def test_a_note_that_never_came_is_written_by_the_next_run(producer):
    """Between the move and its note the consumer died: the next run,
    finding the record still running, notes the loss in its place."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    move_back(producer, inflight(producer, 0))
    second = Delivery(producer, raw, inflight(producer, 1)).take().start()
    record = task_record(producer, task_id)
    assert history_states(record) == ['pending', 'running', 'lost',
                                      'running']
    second.finish()
    assert history_states(task_record(producer, task_id))[-1] == 'complete'


def test_a_history_is_read_in_the_order_redis_took_it(producer):
    """Writers stamp events with their own clocks: a worker whose clock is
    behind the producer's must not put its running before the pending."""
    task_id, raw = queued(producer)
    conn = producer.storage.conn
    log_key = producer.keys.task_log(task_id)
    # The producer's pending is the record's `enqueued` (not stored as an
    # event: reads put it first).
    pending_at = float(conn.hget(producer.keys.task(task_id), 'enqueued'))
    conn.rpush(log_key, json.dumps({'state': 'running',
                                    'at': pending_at - 0.5}))
    conn.rpush(log_key, json.dumps({'state': 'complete',
                                    'at': pending_at - 0.4}))
    assert history_states(task_record(producer, task_id)) == [
        'pending', 'running', 'complete']


# -- the events a record's fields tell --------------------------------------

def fold(app, task_id):
    """What every script that ends a delivery or overwrites its fields
    runs first (scripts.FOLD_LUA): the record's unlogged events into the
    history list.  Returns how many it pushed."""
    from huey_worker.journal.layout import LOG_LENGTH
    from huey_worker.journal.scripts import FOLD_LUA
    keys = app.keys
    return app.storage.conn.eval(
        FOLD_LUA + 'return hw_fold(KEYS[1], KEYS[2], ARGV[1])', 2,
        keys.task(task_id), keys.task_log(task_id), LOG_LENGTH)


def test_a_run_to_its_end_writes_no_history_list(producer):
    """The common life (enqueued, run once, ended) is told by the record
    alone; the history reads the same as one pushed event by event, and
    folding it into the list (as a retry would) changes nothing read."""
    task_id, raw = queued(producer)
    conn, keys = producer.storage.conn, producer.keys
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish()
    assert not conn.exists(keys.task_log(task_id))
    record = task_record(producer, task_id)
    assert history_states(record) == ['pending', 'running', 'complete']
    running, complete = record['history'][1:]
    assert running['at'] == record['started']
    assert running['worker'] == '%s:%s/%s' % (
        record['worker']['host'], record['worker']['pid'],
        record['worker']['worker'])
    assert complete['at'] == record['finished']
    assert complete['duration'] == record['duration']
    assert fold(producer, task_id) == 2
    assert conn.llen(keys.task_log(task_id)) == 2
    assert not [f for f in conn.hkeys(keys.task(task_id))
                if f.startswith(b'run:') or f == b'unlogged']
    assert task_record(producer, task_id)['history'] == record['history']
    assert fold(producer, task_id) == 0   # nothing left to fold


def test_a_request_while_it_runs_sits_between_its_running_and_end(producer):
    """A revoke request pushed while the task runs (the list's only event)
    reads after the running the record tells and before its end; a fold
    puts them in the list in that order."""
    task_id, raw = queued(producer)
    delivery = Delivery(producer, raw, inflight(producer, 0)).take().start()
    from huey_worker import journal
    journal.install(producer).stage_revoke_requested(producer.storage,
                                                     task_id)
    producer.storage.flush()
    delivery.finish(state='revoked')
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'revoke-requested', 'revoked']
    fold(producer, task_id)
    raw_events = producer.storage.conn.lrange(
        producer.keys.task_log(task_id), 0, -1)
    assert [json.loads(e)['state'] for e in raw_events] == [
        'running', 'revoke-requested', 'revoked']
    assert task_record(producer, task_id)['history'] == record['history']


def test_a_running_an_earlier_layout_pushed_is_not_read_twice(producer):
    """A task running when the suite was upgraded: its running is in the
    list (the earlier layout pushed it) and its end is told by the
    record; the running reads once."""
    task_id, raw = queued(producer)
    conn, keys = producer.storage.conn, producer.keys
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish()
    record = task_record(producer, task_id)
    started = record['started']
    conn.rpush(keys.task_log(task_id), json.dumps(record['history'][1]))
    assert conn.hget(keys.task(task_id), 'run:%r' % started)
    assert history_states(task_record(producer, task_id)) == [
        'pending', 'running', 'complete']


# -- what a task does to its worker ------------------------------------------

TASKS = '''
import sys

from huey_worker import huey


@huey.task()
def quits(code):
    sys.exit(code)


@huey.task()
def interrupts():
    raise KeyboardInterrupt('from the task')


@huey.task()
def fine():
    return 'fine'
'''


@pytest.fixture
def exit_tasks(producer, tmp_path):
    with task_module(producer, tmp_path, TASKS, 'exittasks') as module:
        yield module


def consumer_info(app):
    for identity in app.storage.conn.zrange(app.keys.consumers, 0, -1):
        raw = app.storage.conn.get(app.keys.consumer(identity.decode()))
        if raw:
            return json.loads(raw)
    return None


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_sys_exit_in_a_task_fails_the_task_not_the_worker(
        producer, exit_tasks, base_env, start_daemon, worker_type):
    daemon = ready_consumer(
        start_daemon, consumer_env(delivery_env(base_env), exit_tasks),
        ['--workers', '1', '--worker-type', worker_type])
    quit_result = exit_tasks.quits(3)
    record = wait_for_state(producer, quit_result.id, ('failed',), 30)
    assert record['error']['type'] == 'TaskExit'
    assert record['error']['message'].startswith(
        'SystemExit(3) raised by the task (it called sys.exit(3))')
    assert record['attempt'] == 1 and record['requeues'] == 0
    interrupt = exit_tasks.interrupts()
    record = wait_for_state(producer, interrupt.id, ('failed',), 30)
    assert record['error']['message'].startswith(
        'KeyboardInterrupt raised by the task (it raised '
        'KeyboardInterrupt: from the task)')
    # The same worker runs the next task: never restarted.
    assert exit_tasks.fine().get(blocking=True, timeout=30) == 'fine'
    wait_until(lambda: (consumer_info(producer) or {}).get('done', 0) +
               (consumer_info(producer) or {}).get('failed', 0) >= 3,
               what='the heartbeat counting the three tasks')
    assert consumer_info(producer)['restarts'] == 0
    output = daemon.output()
    assert 'died' not in output
    # What the task did is in the log, with its traceback.
    assert 'sys.exit(code)' in output and 'SystemExit: 3' in output
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
