"""Issue 17, revoke and restore: a waiting task by id or a whole task name,
from the CLI and over HTTP; the journal shows revoked at once; restore
before a worker takes it undoes it; both idempotent.  Real consumer,
real Redis, real processes."""
import json
import os
import signal

import pytest

from ops_helpers import (Client, cli, history_states, start_status_server,
                         task_record, wait_for_state, wait_until)


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks',
                HUEY_STATUS_TOKEN='t0ken')


def lines(log):
    return open(log).read().split() if os.path.exists(log) else []


def test_revoke_then_restore_by_id(producer, env, start_daemon, tmp_path):
    import actions_tasks as t
    log = str(tmp_path / 'log')
    kept = t.note(log, 'kept').id
    dropped = t.note(log, 'dropped').id
    later = t.note.schedule((log, 'later'), delay=3600).id

    run = cli(env, 'revoke', kept, dropped, later)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '3 revoked' in run.stdout
    for task_id in (kept, dropped, later):
        record = task_record(producer, task_id)
        assert record['state'] == 'revoked' and \
            record['revoked_reason'] == 'operator'
        revoked = record['history'][-1]
        assert revoked['state'] == 'revoked' and revoked['via'] == 'cli'
    # Again: nothing changes (already revoked), exit 0.
    run = cli(env, 'revoke', kept, '--json')
    assert run.returncode == 0
    assert json.loads(run.stdout)['tasks'][0]['already'] is True
    assert history_states(task_record(producer, kept)).count('revoked') == 1

    run = cli(env, 'restore', kept, later)
    assert run.returncode == 0, run.stdout + run.stderr
    assert task_record(producer, kept)['state'] == 'pending'
    assert task_record(producer, later)['state'] == 'scheduled'
    assert history_states(task_record(producer, kept))[-3:] == [
        'revoked', 'restored', 'pending']
    assert cli(env, 'restore', kept).returncode == 0   # nothing to undo

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    wait_for_state(producer, kept, 'complete')
    record = wait_for_state(producer, dropped, 'revoked')
    wait_until(lambda: task_record(producer, dropped).get('finished'))
    assert lines(log) == ['kept']
    # Skipped by the worker: it has ended; restore is refused, retry runs
    # it (its message was kept with the outcome).
    run = cli(env, 'restore', dropped)
    assert run.returncode == 1 and 'retry it' in run.stdout
    assert cli(env, 'revoke', kept).returncode == 1   # complete: refused
    assert cli(env, 'revoke', 'nope').returncode == 66
    run = cli(env, 'retry', dropped)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for_state(producer, dropped, 'complete')
    assert sorted(lines(log)) == ['dropped', 'kept']
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_revoke_and_restore_a_task_name_over_http(producer, env,
                                                  start_daemon, tmp_path):
    import actions_tasks as t
    log = str(tmp_path / 'log')
    _, port = start_status_server(start_daemon, env)
    client = Client(port, token='t0ken')
    waiting = [t.note(log, 'w%d' % i).id for i in range(3)]
    other = t.quick(1).id

    assert Client(port).json('POST', '/tasks/revoke',
                             {'name': 'note'})[0] == 401
    status, body = client.json('POST', '/tasks/revoke', {'name': 'note'})
    assert status == 200 and body['name'] == 'actions_tasks.note', body
    assert body['done'] == 3
    for task_id in waiting:
        record = task_record(producer, task_id)
        assert record['state'] == 'revoked' and \
            record['revoked_reason'] == 'name'
        assert record['history'][-1]['from'] == '127.0.0.1'
    assert task_record(producer, other)['state'] == 'pending'
    # A task of the name enqueued after is revoked by Huey's name mark.
    late = t.note(log, 'late').id
    # Restoring one of them by id is refused: the name holds them.
    status, body = client.json('POST', '/tasks/%s/restore' % waiting[0])
    assert status == 409 and body['reason'] == 'by-name', body

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    wait_for_state(producer, other, 'complete')
    wait_for_state(producer, late, 'revoked')
    assert lines(log) == []
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0

    status, body = client.json('POST', '/tasks/restore', {'name': 'note'})
    assert status == 200 and body['name_was_revoked'] is True, body
    # The three not yet taken go back; the one a worker skipped has ended.
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    ended = [task_id for task_id in waiting
             if task_record(producer, task_id)['state'] == 'revoked']
    for task_id in set(waiting) - set(ended):
        wait_for_state(producer, task_id, 'complete')
    assert task_record(producer, late)['state'] == 'revoked'
    fresh = t.note(log, 'fresh').id
    wait_for_state(producer, fresh, 'complete')
    assert 'late' not in lines(log) and 'fresh' in lines(log)
    assert body['done'] == len(waiting) - len(ended)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0

    # Revoked and restored before any worker took them: they run.
    again = [t.note(log, 'a%d' % i).id for i in range(2)]
    assert client.json('POST', '/tasks/revoke', {'name': 'note'})[1][
        'done'] == 2
    status, body = client.json('POST', '/tasks/restore', {'name': 'note'})
    assert status == 200 and body['done'] == 2, body
    assert {task_record(producer, i)['state'] for i in again} == {'pending'}
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    for task_id in again:
        wait_for_state(producer, task_id, 'complete')
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
