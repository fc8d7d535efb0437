"""A task's history when the record tells part of it: a delivery's running
and end (run:<started>, unlogged=o) are read from the record's fields
until the worker (a retry, its own requeue, a dead letter) or FOLD_LUA (a
requeue of a dead worker's message, the operator's actions) puts them
into the list.  Each test drives a scenario (deliveries step by step, or
real consumers) and checks the history reads complete, in order, without
an event twice or a loss left out, and that every history list the
scenario leaves expires."""
import json

from ops_helpers import history_states, task_record
from worker_steps_helpers import Delivery, inflight_key as inflight, \
    requeue

from huey_worker import actions, hooks, journal
from huey_worker.journal.layout import LOG_LENGTH
from huey_worker.storage import message_data

import sample_tasks


def queued(app, eta=None):
    result = sample_tasks.add.schedule((2, 3), eta=eta) if eta else \
        sample_tasks.add(2, 3)
    return result.id, app.storage.conn.lindex(app.storage.queue_key, 0)


def head(app):
    return app.storage.conn.lindex(app.storage.queue_key, 0)


def move_back(app, key):
    """The consumer's move of a dead worker's message, its note not
    written (late, or never: the consumer died)."""
    assert requeue(app, key, with_hooks=False) == 1


def no_ttl_logs(app):
    """Every history list without a time to live."""
    conn = app.storage.conn
    out = []
    for key in conn.scan_iter(match='hw:*task-log:*'):
        if conn.ttl(key) < 0:
            out.append(key.decode())
    return out


def running_ats(record):
    return [e['at'] for e in record['history'] if e['state'] == 'running']


# -- a loss a redelivery notes (NOTE_UNNOTED_LOSS) ----------------------------

def test_a_second_unnoted_loss_after_a_noted_one_is_recorded(producer):
    """Worker 1 dies, the consumer notes it (lost, pending); worker 2
    takes the message and dies too; the consumer's move of it comes but
    its note does not (worker 3 took the message first).  Worker 3 must
    note worker 2's loss: the list still ends with the first note's
    pending (worker 2's running is only a record field), so nothing is
    noted and the history reads running, running."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    assert requeue(producer, inflight(producer, 0)) == 1      # noted
    Delivery(producer, raw, inflight(producer, 1)).take().start().die()
    move_back(producer, inflight(producer, 1))                # not noted
    Delivery(producer, raw, inflight(producer, 2)).take().start().finish()
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'lost', 'pending', 'running', 'lost',
        'running', 'complete']
    assert not no_ttl_logs(producer)


def test_an_unnoted_loss_after_a_retry_action_is_recorded(producer):
    """A failed task retried by the operator (history ends retried,
    pending), its new delivery's worker dies and the consumer's note
    comes late: the next delivery must note the loss."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish(
        'failed')
    [outcome] = actions.retry(producer, [task_id], actions.Actor.cli())
    assert outcome.done, outcome.as_dict()
    raw = head(producer)
    Delivery(producer, raw, inflight(producer, 1)).take().start().die()
    move_back(producer, inflight(producer, 1))
    Delivery(producer, raw, inflight(producer, 2)).take().start().finish()
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'failed', 'retried', 'pending', 'running',
        'lost', 'running', 'complete']


def test_a_revoke_after_a_noted_requeue_adds_no_second_loss(producer):
    """Worker 1 dies, the consumer notes it (lost, pending); the operator
    revokes the pending task (history ends `revoked`); a worker takes the
    message (its delivery count is 2) and skips it.  One loss happened:
    the history must read it once (the earlier NOTE_UNNOTED_LOSS noted
    nothing here: the event before the new running was no running)."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    assert requeue(producer, inflight(producer, 0)) == 1
    [outcome] = actions.revoke(producer, [task_id], actions.Actor.cli())
    assert outcome.done, outcome.as_dict()
    Delivery(producer, raw, inflight(producer, 1)).take().start().finish(
        'revoked')
    states = history_states(task_record(producer, task_id))
    assert states.count('lost') == 1, states


# -- TTL of history lists -----------------------------------------------------

def test_a_refused_restore_leaves_no_history_without_ttl(producer):
    """Revoked by Huey itself (a producer's revoke), skipped by the worker:
    the task ran once to its end, so it has no history list.  A restore
    is refused (`ended`), but RESTORE folds before it refuses and returns
    without the EXPIRE: a list with no time to live is left forever."""
    result = sample_tasks.add(2, 3)
    task_id, raw = result.id, head(producer)
    result.revoke()
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish(
        'revoked')
    conn, keys = producer.storage.conn, producer.keys
    assert not conn.exists(keys.task_log(task_id))
    [outcome] = actions.restore(producer, [task_id], actions.Actor.cli())
    assert not outcome.done and outcome.reason == 'ended'
    assert not no_ttl_logs(producer), conn.ttl(keys.task_log(task_id))


# -- the length of a history -------------------------------------------------

def test_a_history_reads_at_most_log_length_events(producer):
    """A task whose list is full (LOG_LENGTH events: many retries) runs
    once more to its end: the history must still be the last LOG_LENGTH
    changes, not LOG_LENGTH plus the record's unlogged ones."""
    task_id, raw = queued(producer)
    conn, keys = producer.storage.conn, producer.keys
    for i in range(LOG_LENGTH):
        conn.rpush(keys.task_log(task_id), json.dumps(
            {'state': 'revoke-requested', 'at': 1000.0 + i}))
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish()
    record = task_record(producer, task_id)
    assert history_states(record)[-2:] == ['running', 'complete']
    assert len(record['history']) <= LOG_LENGTH, len(record['history'])


# -- end to end: real consumers ----------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from ops_helpers import (Client, cli, delivery_env,  # noqa: E402
                         start_status_server, wait_for_state, wait_until)
from task_module_helpers import consumer_env, ready_consumer, \
    task_module  # noqa: E402

FLAKY = '''
import os
import time

from huey_worker import huey


def _fails(path, n):
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, 'w') as f:
        f.write(str(count + 1))
    return count < n


@huey.task(retries=2, retry_delay=0)
def flaky_now(path, n):
    if _fails(path, n):
        raise RuntimeError('flaky %s' % n)
    return 'ok'


@huey.task(retries=2, retry_delay=1)
def flaky_later(path, n):
    if _fails(path, n):
        raise RuntimeError('flaky %s' % n)
    return 'ok'


@huey.task()
def fail_unless(flag):
    if not os.path.exists(flag):
        raise RuntimeError('no flag yet')
    return 'ok'


@huey.task()
def hold(path, seconds):
    with open(path, 'a') as f:
        f.write('%d\\n' % os.getpid())
    time.sleep(seconds)
    return 'held'
'''


@pytest.fixture
def flaky(producer, tmp_path):
    with task_module(producer, tmp_path, FLAKY, 'breakfold') as module:
        yield module


def check_history(app, record):
    """Complete and ordered (one host: one clock), no event twice, one
    running per attempt, every history list expiring."""
    history = record['history']
    pairs = [(e['state'], e.get('at')) for e in history]
    assert len(pairs) == len(set(pairs)), history
    ats = [e.get('at') for e in history]
    assert ats == sorted(ats), "\n".join(map(str, history))
    assert len(running_ats(record)) == record.get('attempt'), history
    assert not no_ttl_logs(app)


def same_everywhere(env, port, task_id, record):
    """GET /tasks/<id> and `huey-worker task ID --json` read the same
    history as read_task."""
    status, body = Client(port, 't0ken').get('/tasks/%s' % task_id)
    assert status == 200
    run = cli(env, 'task', task_id, '--json')
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert body['history'] == record['history']
    assert shown['history'] == record['history']


@pytest.mark.parametrize('workers', ['thread', 'process'])
@pytest.mark.parametrize('later', [False, True])
def test_e2e_retries_then_complete(producer, flaky, base_env, start_daemon,
                                   tmp_path, workers, later):
    env = consumer_env(base_env, flaky, HUEY_STATUS_TOKEN='t0ken')
    ready_consumer(start_daemon, env, ['--workers', '2', '--set',
                                       'consumer.worker_type=%s' % workers])
    if later:
        start_daemon(['scheduler'], env, 'scheduler')
    task = flaky.flaky_later if later else flaky.flaky_now
    result = task(str(tmp_path / 'count'), 2)
    try:
        record = wait_for_state(producer, result.id, 'complete', 30)
    except AssertionError:
        print(json.dumps(task_record(producer, result.id), indent=0))
        raise
    states = history_states(record)
    assert states.count('running') == 3, states
    assert states.count('retrying') == 2, states
    assert states[-2:] == ['running', 'complete'], states
    for i, s in enumerate(states):
        if s == 'retrying':
            assert states[i - 1] == 'running', states
    check_history(producer, record)
    _, port = start_status_server(start_daemon, env)
    same_everywhere(env, port, result.id, record)


def test_e2e_retry_action_twice(producer, flaky, base_env, start_daemon,
                                tmp_path):
    """failed, retried, failed, retried, complete: every running and end
    once, in order."""
    env = consumer_env(base_env, flaky, HUEY_STATUS_TOKEN='t0ken')
    ready_consumer(start_daemon, env, ['--workers', '2'])
    flag = str(tmp_path / 'flag')
    task_id = flaky.fail_unless(flag).id
    wait_for_state(producer, task_id, 'failed', 30)
    assert cli(env, 'retry', task_id).returncode == 0
    wait_until(lambda: task_record(producer, task_id)['attempt'] == 2 and
               task_record(producer, task_id)['state'] == 'failed', 30)
    assert cli(env, 'retry', task_id).returncode == 0
    wait_until(lambda: task_record(producer, task_id)['attempt'] == 3 and
               task_record(producer, task_id)['state'] == 'failed', 30)
    open(flag, 'w').close()
    assert cli(env, 'retry', task_id).returncode == 0
    record = wait_for_state(producer, task_id, 'complete', 30)
    assert history_states(record) == [
        'pending', 'running', 'failed', 'retried', 'pending', 'running',
        'failed', 'retried', 'pending', 'running', 'failed', 'retried',
        'pending', 'running', 'complete']
    check_history(producer, record)
    _, port = start_status_server(start_daemon, env)
    same_everywhere(env, port, task_id, record)


def test_e2e_killed_process_worker_then_complete(producer, flaky, base_env,
                                                 start_daemon, tmp_path):
    env = consumer_env(delivery_env(base_env), flaky)
    daemon = ready_consumer(start_daemon, env, [
        '--workers', '1', '--worker-type', 'process'])
    pids = tmp_path / 'pids'
    result = flaky.hold(str(pids), 2)
    wait_until(lambda: pids.exists() and pids.read_text().strip(), 30)
    os.kill(int(pids.read_text().split()[0]), signal.SIGKILL)
    record = wait_for_state(producer, result.id, 'complete', 60)
    states = history_states(record)
    assert states == ['pending', 'running', 'lost', 'pending', 'running',
                      'complete'], states
    check_history(producer, record)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_e2e_poison_dead_letter_requeue(producer, base_env, start_daemon):
    import delivery_tasks
    env = delivery_env(base_env, HUEY_WORKER_DELIVERY_MAX_DELIVERIES=2)
    daemon = ready_consumer(start_daemon, env, [
        '--workers', '1', '--worker-type', 'process'])
    storage = producer.storage
    result = delivery_tasks.kill_my_worker()
    wait_until(lambda: storage.conn.llen(producer.keys.dead) == 1, 60)
    record = wait_for_state(producer, result.id, 'failed', 30)
    first = history_states(record)
    check_history(producer, record)
    run = cli(env, 'dead-letters', 'requeue', result.id)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_until(lambda: task_record(producer, result.id)['state'] == 'failed'
               and task_record(producer, result.id)['attempt'] >= 4, 60)
    record = task_record(producer, result.id)
    states = history_states(record)
    assert states[:len(first)] == first, (first, states)
    assert states.count('running') == 2 * first.count('running'), states
    check_history(producer, record)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


# -- a request while it runs, then each end ----------------------------------

@pytest.mark.parametrize('end', ['complete', 'failed', 'canceled',
                                 'revoked', 'retrying'])
@pytest.mark.parametrize('request_kind', ['revoke', 'cancel'])
def test_a_request_while_running_then_each_end(producer, end, request_kind):
    """A revoke request (or a cancel request) pushed while the task runs
    reads after its running and before its end, whatever the end; folding
    (a retry of an ended one) changes nothing read."""
    task_id, raw = queued(producer)
    delivery = Delivery(producer, raw, inflight(producer, 0)).take().start()
    if request_kind == 'revoke':
        journal.install(producer).stage_revoke_requested(producer.storage,
                                                         task_id)
        producer.storage.flush()
        asked = 'revoke-requested'
    else:
        [outcome] = actions.cancel(producer, [task_id], actions.Actor.cli())
        assert outcome.done and outcome.result == 'requested', \
            outcome.as_dict()
        asked = 'cancel-requested'
    time.sleep(0.01)
    delivery.finish(state=end)
    record = task_record(producer, task_id)
    assert history_states(record) == ['pending', 'running', asked, end]
    check_history(producer, record)
    if end in ('failed', 'canceled', 'revoked'):
        [outcome] = actions.retry(producer, [task_id], actions.Actor.cli())
        assert outcome.done, outcome.as_dict()
        again = task_record(producer, task_id)
        assert again['history'][:4] == record['history']
        assert history_states(again)[4:] == ['retried', 'pending']


def test_an_interrupted_delivery_after_a_request(producer):
    """The worker's own requeue (interrupted: its consumer stops) of a
    task with a revoke request: running, revoke-requested, interrupted,
    pending."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start()
    journal.install(producer).stage_revoke_requested(producer.storage,
                                                     task_id)
    producer.storage.flush()
    time.sleep(0.01)
    # As Worker._finish does for 'interrupted', in the worker's thread
    # (its task context still set: the requeue rides its round trip).
    from huey_worker import progress
    assert progress.current() is not None
    hooks.call(hooks.on_requeued, producer.storage, [message_data(raw)],
               'interrupted')
    producer.storage.flush()
    record = task_record(producer, task_id)
    assert history_states(record) == [
        'pending', 'running', 'revoke-requested', 'interrupted', 'pending']


# -- the worker label, written by Lua and by Python --------------------------

@pytest.mark.parametrize('host', ['h"o\\st/x', 'h\u00e9\u2603st', 'a\tb\x01c',
                                  '1e5', '"'])
def test_a_label_reads_the_same_folded_by_lua(producer, monkeypatch, host):
    import worker_steps_helpers
    # A new dict: the journal caches the label per worker_info object.
    monkeypatch.setattr(worker_steps_helpers, 'WORKER',
                        dict(worker_steps_helpers.WORKER, host=host))
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().finish(
        'failed')
    record = task_record(producer, task_id)
    assert record['history'][1]['worker'] == '%s:4242/0' % host
    [outcome] = actions.retry(producer, [task_id], actions.Actor.cli())
    assert outcome.done, outcome.as_dict()
    conn = producer.storage.conn
    for item in conn.lrange(producer.keys.task_log(task_id), 0, -1):
        json.loads(item)       # well-formed
    again = task_record(producer, task_id)
    assert again['history'][:3] == record['history']


# -- hosts' clocks -----------------------------------------------------------

def test_a_history_keeps_redis_order_when_the_consumer_clock_is_ahead(
        producer):
    """The consumer that notes a loss runs on a host 5 s ahead; the next
    delivery runs on a host with the right time.  Redis took lost and
    pending before the second running: the history must read so (as the
    earlier layout did: 'the order Redis took them, not sorted by at')."""
    task_id, raw = queued(producer)
    Delivery(producer, raw, inflight(producer, 0)).take().start().die()
    assert requeue(producer, inflight(producer, 0)) == 1
    conn, log_key = producer.storage.conn, producer.keys.task_log(task_id)
    items = [json.loads(i) for i in conn.lrange(log_key, 0, -1)]
    conn.delete(log_key)
    for item in items:
        if item['state'] in ('lost', 'pending'):
            item['at'] += 5.0
        conn.rpush(log_key, json.dumps(item))
    conn.expire(log_key, 3600)
    Delivery(producer, raw, inflight(producer, 1)).take().start().finish()
    assert history_states(task_record(producer, task_id)) == [
        'pending', 'running', 'lost', 'pending', 'running', 'complete']
