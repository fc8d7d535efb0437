"""Issue 17, cancel: a running task is stopped (process worker: SIGTERM,
replaced; thread worker: TaskCanceled at its next report_progress() or
check_cancelled(), raised in its thread after a grace otherwise), ends
canceled, and no put-back path (a restart, the recovery of a dead
consumer) delivers it again.  A waiting task is revoked.  Real consumers,
real signals, the session's private Redis."""
import json
import os
import signal

import pytest

from ops_helpers import (Client, cli, history_states, start_status_server,
                         task_record, wait_for_state, wait_until)
from task_module_helpers import consumer_env, task_module


TASKS = '''
import os
import time

from huey_worker import check_cancelled, huey, TaskCanceled
from huey_worker.journal import report_progress


def note(log, line):
    with open(log, 'a') as fh:
        fh.write(line + '\\n')


@huey.task()
def reporting(log):
    """Reports progress until cancelled; says where the cancel came."""
    note(log, 'start %d' % os.getpid())
    try:
        for i in range(100000):
            report_progress(i)
            time.sleep(0.02)
    except TaskCanceled:
        note(log, 'canceled at report_progress')
        raise
    note(log, 'ran to the end')


@huey.task()
def checking(log):
    note(log, 'start %d' % os.getpid())
    try:
        while True:
            check_cancelled()
            time.sleep(0.02)
    except TaskCanceled:
        note(log, 'canceled at check_cancelled')
        raise


@huey.task()
def sleeping(log):
    """One long C call (time.sleep) and Python lines: no check at all."""
    note(log, 'start %d' % os.getpid())
    try:
        for _ in range(3000):
            time.sleep(0.02)
    finally:
        note(log, 'left the body')


@huey.task()
def stubborn(log):
    """Swallows the cancel: only SIGKILL ends it."""
    note(log, 'start %d' % os.getpid())
    while True:
        try:
            time.sleep(60)
        except TaskCanceled:
            note(log, 'ignored the cancel')


@huey.task()
def note_task(log, token):
    note(log, '%s %d' % (token, os.getpid()))
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'canceltasks') as module:
        module.env.update({'HUEY_STATUS_TOKEN': 't0ken',
                           'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
                           'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT': '3'})
        yield module


env_of = consumer_env


def lines(log):
    return open(log).read().splitlines() if os.path.exists(log) else []


def started(log):
    return [l for l in lines(log) if l.startswith('start ')]


def marks(producer, task_id):
    """The task's cancel mark and every message mark still in Redis."""
    conn, keys = producer.storage.conn, producer.storage.keys
    return (conn.exists(keys.cancel(task_id)),
            list(conn.scan_iter(keys.cancel_message_prefix + '*')))


def consumer(start_daemon, env, worker_type, name='consumer', **extra):
    env = dict(env, HUEY_WORKER_TYPE=worker_type, HUEY_WORKERS='1',
               **{k: str(v) for k, v in extra.items()})
    daemon = start_daemon(['consumer'], env, name)
    daemon.wait_for_output('consumer ready')
    return daemon


@pytest.mark.slow
@pytest.mark.parametrize('task,where', [('reporting', 'report_progress'),
                                        ('checking', 'check_cancelled')])
def test_a_thread_task_is_cancelled_at_its_next_check(
        base_env, start_daemon, producer, tasks, tmp_path, task, where):
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    daemon = consumer(start_daemon, env, 'thread')
    running = getattr(tasks, task)(log)
    wait_until(lambda: started(log), what='the task to start')
    wait_for_state(producer, running.id, 'running')

    run = cli(env, 'cancel', running.id)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'cancel requested' in run.stdout
    record = wait_for_state(producer, running.id, 'canceled')
    assert 'canceled at %s' % where in lines(log)
    assert 'ran to the end' not in lines(log)
    states = history_states(record)
    assert states[-2:] == ['cancel-requested', 'canceled'], states
    requested = record['history'][-2]
    assert requested['via'] == 'cli' and requested['from']
    assert record.get('finished')
    assert marks(producer, running.id) == (0, [])
    # Idempotent: cancelled already, nothing changes.
    run = cli(env, 'cancel', running.id, '--json')
    assert run.returncode == 0
    assert json.loads(run.stdout)['tasks'][0]['already'] is True
    assert history_states(task_record(producer, running.id)) == states
    # The same worker thread goes on with the next task.
    after = tasks.note_task(log, 'after')
    wait_for_state(producer, after.id, 'complete')
    assert 'died' not in daemon.output()
    # Its message was kept: a retry runs it again.
    assert cli(env, 'retry', running.id).returncode == 0
    wait_until(lambda: len(started(log)) == 2, what='the retried run')


@pytest.mark.slow
def test_a_thread_task_without_checks_gets_the_exception_in_its_thread(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    daemon = consumer(start_daemon, env, 'thread')
    running = tasks.sleeping(log)
    wait_until(lambda: started(log), what='the task to start')
    assert cli(env, 'cancel', running.id).returncode == 0
    wait_for_state(producer, running.id, 'canceled')
    assert 'left the body' in lines(log)
    assert 'TaskCanceled raised in its thread' in daemon.output()


@pytest.mark.slow
def test_a_process_task_is_terminated_and_its_worker_replaced(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    daemon = consumer(start_daemon, env, 'process')
    _, port = start_status_server(start_daemon, env)
    client = Client(port, 't0ken')
    status, index = client.get('/')
    assert 'POST /tasks/<id>/cancel' in index['routes']
    running = tasks.sleeping(log)
    wait_until(lambda: started(log), what='the task to start')
    first_pid = int(started(log)[0].split()[1])

    status, body = client.json('POST', '/tasks/%s/cancel' % running.id, {})
    assert status == 202, body
    assert body['result'] == 'requested' and body['state'] == 'running'
    record = wait_for_state(producer, running.id, 'canceled')
    assert 'left the body' in lines(log)   # SIGTERM: finally blocks ran
    assert record['history'][-2]['via'] == 'http'
    daemon.wait_for_output('ended for a cancelled task')
    after = tasks.note_task(log, 'after')
    wait_for_state(producer, after.id, 'complete')
    pid = int([l for l in lines(log) if l.startswith('after')][0].split()[1])
    assert pid != first_pid           # a new worker process runs it
    status, body = client.json('POST', '/tasks/%s/cancel' % running.id, {})
    assert status == 200 and body['already'] is True
    assert client.json('POST', '/tasks/%s/cancel' % running.id, {},
                       auth=False)[0] == 401
    assert client.json('POST', '/tasks/nope/cancel', {})[0] == 404
    status, body = client.json('POST', '/tasks/%s/cancel' % after.id, {})
    assert status == 409 and body['state'] == 'complete'


@pytest.mark.slow
def test_a_process_task_that_ignores_sigterm_is_killed(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    daemon = consumer(start_daemon, env, 'process')
    running = tasks.stubborn(log)
    wait_until(lambda: started(log), what='the task to start')
    assert cli(env, 'cancel', running.id).returncode == 0
    record = wait_for_state(producer, running.id, 'canceled')
    assert 'ignored the cancel' in lines(log)
    daemon.wait_for_output('did not end within')
    assert len(started(log)) == 1     # the put-back dropped its message
    assert history_states(record).count('running') == 1
    assert marks(producer, running.id) == (0, [])
    after = tasks.note_task(log, 'after')
    wait_for_state(producer, after.id, 'complete')


@pytest.mark.slow
@pytest.mark.parametrize('successor', ['same', 'other'],
                         ids=['restarted', 'recovered-by-a-peer'])
def test_a_task_cancelled_while_its_consumer_dies_is_not_run_again(
        base_env, start_daemon, producer, tasks, tmp_path, successor):
    """The consumer is frozen (SIGSTOP: it cannot pass the cancel on) when
    the cancel comes, then killed (-9; its process worker dies with it).
    Its successor (the same identity restarted, which puts back what it
    held at once; or a peer that recovers it once its heartbeat expired)
    must drop the message, and the task ends canceled: one run only."""
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    first = consumer(start_daemon, env, 'process', 'first',
                     HUEY_WORKER_CONSUMER_IDENTITY='first')
    running = tasks.sleeping(log)
    wait_until(lambda: started(log), what='the task to start')
    wait_for_state(producer, running.id, 'running')
    first.signal(signal.SIGSTOP)
    run = cli(env, 'cancel', running.id)
    assert run.returncode == 0 and 'cancel requested' in run.stdout, \
        run.stdout + run.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    # Its worker dies with it (PR_SET_PDEATHSIG): no 'left the body'.
    second = consumer(start_daemon, env, 'process', 'second',
                      HUEY_WORKER_CONSUMER_IDENTITY='first'
                      if successor == 'same' else 'second')
    record = wait_for_state(producer, running.id, 'canceled', timeout=30)
    assert history_states(record).count('running') == 1
    second.wait_for_output('was cancelled: its message is dropped')
    after = tasks.note_task(log, 'after')
    wait_for_state(producer, after.id, 'complete')
    assert len(started(log)) == 1, lines(log)
    assert 'start %s.sleeping %s' % (tasks.name, running.id) not in \
        second.output()
    assert producer.storage.queue_size() == 0
    assert marks(producer, running.id) == (0, [])


def test_cancelling_a_waiting_task_revokes_it(base_env, producer, tasks,
                                              tmp_path):
    env = env_of(base_env, tasks)
    log = str(tmp_path / 'log')
    waiting = tasks.note_task(log, 'never')
    run = cli(env, 'cancel', waiting.id, '--json')
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)['tasks'][0]['result'] == 'revoked'
    record = task_record(producer, waiting.id)
    assert record['state'] == 'revoked'
    assert record['revoked_reason'] == 'canceled'
    assert cli(env, 'cancel', waiting.id).returncode == 0     # already
    assert cli(env, 'restore', waiting.id).returncode == 0
    assert task_record(producer, waiting.id)['state'] == 'pending'
    assert cli(env, 'cancel', 'no-such-task').returncode == 66
