"""Issue 17, retry: a task that ended failed runs again by id, by task name
or by state and time window, as a new delivery of the same id with the
same arguments (the message the journal kept with the outcome); twice
runs it once; a retry while it runs again is refused.  Real consumers
(thread and process), real Redis, the CLI and HTTP as a user runs them."""
import json
import os
import signal
import threading

import pytest

from ops_helpers import (Client, cli, history_states, start_status_server,
                         task_record, wait_for_state, wait_until)


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks',
                HUEY_STATUS_TOKEN='t0ken')


@pytest.fixture
def tasks(producer):
    import actions_tasks
    return actions_tasks


def runs(log):
    return open(log).read().split('\n')[:-1] if os.path.exists(log) else []


@pytest.mark.parametrize('workers', ['thread', 'process'])
def test_retry_by_id_runs_the_same_arguments_once(
        workers, producer, tasks, env, start_daemon, tmp_path):
    flag, log = str(tmp_path / 'flag'), str(tmp_path / 'log')
    consumer = start_daemon(['consumer', '--workers', '2', '--set',
                             'consumer.worker_type=%s' % workers], env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    task_id = tasks.fail_unless(flag, log, 'tok-1').id
    record = wait_for_state(producer, task_id, 'failed')
    assert record['error']['message'] == 'no flag yet'
    keys = producer.storage.keys
    assert producer.storage.conn.ttl(keys.message(task_id)) > 0

    open(flag, 'w').close()
    run = cli(env, 'retry', task_id)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '1 retried' in run.stdout
    record = wait_for_state(producer, task_id, 'complete')
    assert record['result'] == 'tok-1'          # the same arguments
    assert record['retried'] == 1 and record['attempt'] == 2
    assert runs(log) == ['run tok-1', 'run tok-1']
    states = history_states(record)
    # The failed delivery's running and end, told by the record until the
    # retry overwrote them, are in the history before the retry.
    assert states == ['pending', 'running', 'failed', 'retried', 'pending',
                      'running', 'complete']
    assert record['history'][2]['error'] == 'RuntimeError'
    retried = record['history'][states.index('retried')]
    assert retried['via'] == 'cli' and retried['by'] and retried['from']
    assert record['last_action']['action'] == 'retry'
    # The kept message went back to the queue: none is left to run twice.
    assert not producer.storage.conn.exists(keys.message(task_id))

    # A complete task is not retried (exit 1), an unknown one is 66.
    run = cli(env, 'retry', task_id)
    assert run.returncode == 1 and 'refused' in run.stdout
    assert cli(env, 'retry', 'no-such-task').returncode == 66
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    assert runs(log) == ['run tok-1', 'run tok-1']


def test_retrying_twice_at_once_enqueues_once(producer, tasks, env,
                                              start_daemon, tmp_path):
    """Two operators retrying the same task at the same moment: one
    enqueue (the check and the enqueue are one script)."""
    from huey_worker import actions
    flag, log = str(tmp_path / 'flag'), str(tmp_path / 'log')
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    task_id = tasks.fail_unless(flag, log, 'tok-2').id
    wait_for_state(producer, task_id, 'failed')
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0

    storage = producer.storage
    barrier = threading.Barrier(8)
    outcomes = []

    def one():
        barrier.wait()
        outcomes.append(actions.retry_one(producer, storage, task_id,
                                          actions.Actor.cli()))
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.done for o in outcomes) == 1
    assert {o.reason for o in outcomes if not o.done} <= {'state',
                                                          'no-message',
                                                          'changed'}
    assert storage.queue_size() == 1
    assert history_states(task_record(producer, task_id)).count(
        'retried') == 1

    open(flag, 'w').close()
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert wait_for_state(producer, task_id, 'complete')['result'] == 'tok-2'
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    assert runs(log) == ['run tok-2', 'run tok-2']


def test_retry_while_it_runs_again_is_refused_over_http(
        producer, tasks, env, start_daemon, tmp_path):
    """Process workers: the retried run holds; a second retry meanwhile
    (HTTP, with the token) is refused with 409, and after it fails again
    the next retry is accepted.  The history names the client."""
    gate, log = str(tmp_path / 'gate'), str(tmp_path / 'log')
    consumer = start_daemon(['consumer', '--workers', '2', '--set',
                             'consumer.worker_type=process'], env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    _, port = start_status_server(start_daemon, env)
    client = Client(port, token='t0ken')
    open(gate, 'w').close()
    task_id = tasks.hold_then_fail(gate, log).id
    wait_for_state(producer, task_id, 'failed')
    os.unlink(gate)

    assert Client(port).json('POST', '/tasks/%s/retry' % task_id)[0] == 401
    status, body = client.json('POST', '/tasks/%s/retry' % task_id)
    assert status == 200 and body['retried'] is True, body
    assert body['state'] == 'failed'
    wait_for_state(producer, task_id, 'running')
    wait_until(lambda: len(runs(log)) == 2)
    status, body = client.json('POST', '/tasks/%s/retry' % task_id)
    assert status == 409 and body['state'] == 'running', body
    status, body = client.json('POST', '/tasks/retry', {'ids': [task_id]})
    assert status == 200 and body['done'] == 0 and body['refused'] == 1

    open(gate, 'w').close()
    wait_for_state(producer, task_id, 'failed')
    status, body = client.json('POST', '/tasks/retry', {'ids': [task_id]})
    assert status == 200 and body['done'] == 1, body
    record = wait_for_state(producer, task_id, 'failed')
    assert record['retried'] == 2
    wait_until(lambda: len(runs(log)) == 3)
    events = [e for e in record['history'] if e['state'] == 'retried']
    assert all(e['via'] == 'http' and e['from'] == '127.0.0.1' and
               e['by'] == 'token' for e in events)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    assert len(runs(log)) == 3


def test_retry_by_name_state_and_window(producer, tasks, env, start_daemon,
                                        tmp_path):
    from huey_worker import actions
    flag, log = str(tmp_path / 'flag'), str(tmp_path / 'log')
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    failed = [tasks.fail_unless(flag, log, 't%d' % i).id for i in range(3)]
    other = producer.enqueue(__import__('sample_tasks').boom.s()).id
    for task_id in failed + [other]:
        wait_for_state(producer, task_id, 'failed')
    open(flag, 'w').close()

    # Bad input: a state that cannot be retried, a time that is none.
    run = cli(env, 'retry', '--state', 'complete')
    assert run.returncode == 64   # click's choice: a usage error
    run = cli(env, 'retry', '--name', 'fail_unless', '--since', 'yesterday')
    assert run.returncode == 65 and 'is not a time' in run.stderr
    assert cli(env, 'retry').returncode == 64

    # A window that holds none of them retries nothing.
    run = cli(env, 'retry', '--name', 'fail_unless', '--until', '2h')
    assert run.returncode == 0 and '0 retried' in run.stdout
    run = cli(env, 'retry', '--name', 'fail_unless', '--state', 'failed',
              '--since', '1h', '--json')
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)['done'] == 3
    for task_id in failed:
        wait_for_state(producer, task_id, 'complete')
    assert task_record(producer, other)['state'] == 'failed'
    assert sorted(runs(log)) == sorted(['run t0', 'run t1', 'run t2'] * 2)
    # Selecting again finds nothing left to retry (all complete).
    ids = actions.select_retryable(producer, producer.storage,
                                   name='actions_tasks.fail_unless')
    assert ids == []
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_retry_of_a_poison_message_removes_its_dead_letter(
        producer, tasks, env, start_daemon, tmp_path):
    """A message set aside (here: an unknown task, deployed later) is
    kept by the dead-letter path; its retry enqueues it and takes the dead
    letter away, so a dead-letter requeue cannot run it twice."""
    from huey_worker import deadletters
    log = str(tmp_path / 'log')
    narrow = dict(env, HUEY_MODULES='sample_tasks')
    consumer = start_daemon(['consumer', '--workers', '1'], narrow,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    task_id = tasks.note(log, 'late').id
    record = wait_for_state(producer, task_id, 'failed')
    assert record['error']['dead_letter'] == 'unknown-task'
    assert deadletters.count(producer.storage) == 1
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    run = cli(env, 'retry', task_id)
    assert run.returncode == 0, run.stdout + run.stderr
    assert wait_for_state(producer, task_id, 'complete')['result'] == 'late'
    assert deadletters.count(producer.storage) == 0
    assert runs(log) == ['late']
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
