"""The operator commands as a user runs them (real processes, real Redis,
a real consumer): submit, wait, task, workers, status; tables by default,
--json for scripts, documented exit codes."""
import json
import os
import socket
import subprocess
import sys

import pytest

from ops_helpers import task_record, wait_for_state, wait_until

import sample_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')


def cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_wait_task_workers_status(producer, env, start_daemon,
                                         tmp_path):
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')

    run = cli(env, 'submit', 'add', '2', '40')
    assert run.returncode == 0, run.stderr
    task_id = run.stdout.strip()
    run = cli(env, 'wait', task_id, '--timeout', '30')
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith('%s complete' % task_id)
    assert run.stdout.splitlines()[-1] == '42'

    run = cli(env, 'task', task_id, '--json')
    assert run.returncode == 0
    record = json.loads(run.stdout)
    assert record['state'] == 'complete' and record['result'] == 42
    assert record['args'] == {'args': [2, 40], 'kwargs': {}}
    run = cli(env, 'task', task_id)
    assert 'state     complete' in run.stdout and 'result    42' in \
        run.stdout and 'history:' in run.stdout

    # A failing task: --wait gives exit 1 and the error.
    run = cli(env, 'submit', 'sample_tasks.boom', '--wait')
    assert run.returncode == 1
    assert 'failed' in run.stdout and 'ValueError: boom' in run.stdout

    # Progress lines (stderr is not a terminal here) and the outcome.
    gate = tmp_path / 'gate'
    run = cli(env, 'submit', 'progress_steps', '6', json.dumps(str(gate)),
              '--json')
    steps_id = json.loads(run.stdout)['task_id']
    wait_until(lambda: (task_record(producer, steps_id).get('progress') or {})
               .get('current') == 3, what='progress 3/6')

    # While it runs: workers shows it, wait --timeout gives 75.
    run = cli(env, 'workers')
    assert run.returncode == 0
    assert consumer_identity(env) in run.stdout and steps_id in run.stdout
    assert 'sample_tasks.progress_steps' in run.stdout
    run = cli(env, 'workers', '--json')
    report = json.loads(run.stdout)
    assert report['totals'] == {'consumers': 1, 'workers': 2, 'busy': 1,
                                'idle': 1, 'restarts': 0}
    assert report['consumers'][0]['pid'] == consumer.pid
    run = cli(env, 'wait', steps_id, '--timeout', '0.5')
    assert run.returncode == 75
    assert 'running [' in run.stderr and '3/6 step 3 of 6' in run.stderr

    run = cli(env, 'status')
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith('health: ok')
    assert 'QUEUE' in run.stdout and steps_id in run.stdout
    run = cli(env, 'status', '--json')
    report = json.loads(run.stdout)
    assert report['queue']['huey']['running'] == 1
    assert report['workers']['busy'] == 1
    assert [t['id'] for t in report['recent']][0] == steps_id

    gate.touch()
    run = cli(env, 'wait', steps_id, '--json')
    assert run.returncode == 0
    assert json.loads(run.stdout)['result'] == {'steps': 6}


def consumer_identity(env):
    return '%s:main' % os.uname().nodename


def test_exit_codes_for_bad_input(producer, env):
    run = cli(env, 'submit', 'nosuch')
    assert run.returncode == 66 and 'no registered task named' in run.stderr
    run = cli(env, 'submit', 'add', '--kwargs', '{bad')
    assert run.returncode == 65 and '--kwargs is not valid JSON' in run.stderr
    run = cli(env, 'submit', 'add', '--kwargs', '[1]')
    assert run.returncode == 65
    run = cli(env, 'task', 'no-such-id')
    assert run.returncode == 66 and 'unknown task id' in run.stderr
    run = cli(env, 'wait', 'no-such-id')
    assert run.returncode == 66

    # No consumer: status says why and exits 1.
    run = cli(env, 'status')
    assert run.returncode == 1
    assert 'no live consumer' in run.stdout

    # Strings stay strings; JSON is parsed.
    run = cli(env, 'submit', 'call_api', 'https://x.test', '--kwargs',
              '{"token": "abc"}', '--delay', '3600', '--json')
    body = json.loads(run.stdout)
    assert body['state'] == 'scheduled'
    record = task_record(producer, body['task_id'])
    assert record['args'] == {'args': ['https://x.test'],
                              'kwargs': {'token': '********'}}

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead = s.getsockname()[1]
    down = dict(env, HUEY_REDIS_URL='redis://127.0.0.1:%d/0' % dead,
                HUEY_WORKER_REDIS_CONNECT_TIMEOUT='0.2')
    for args in (('task', 'x'), ('workers',), ('submit', 'add', '1', '2'),
                 ('wait', 'x'), ('status',)):
        run = cli(down, *args)
        assert run.returncode == 69, (args, run.stderr)
        assert run.stderr.startswith('huey-worker: Redis unreachable at '
                                     'redis://127.0.0.1:%d/0 (' % dead)


def test_wait_exit_codes_by_final_state(producer, env, start_daemon):
    revoked = sample_tasks.add(1, 1)
    producer.revoke_by_id(revoked.id, revoke_once=True)
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    wait_for_state(producer, revoked.id, 'revoked')
    run = cli(env, 'wait', revoked.id, '-q')
    assert run.returncode == 1 and 'revoked' in run.stdout
    assert run.stderr == ''


def test_submit_priority_ranks_the_task_and_refuses_non_numbers(producer,
                                                                 env):
    from huey_worker.storage import message_data, message_priority
    storage = producer.storage
    plain = cli(env, 'submit', 'sample_tasks.add', '1', '2')
    assert plain.returncode == 0, plain.stderr
    ranked = cli(env, 'submit', 'sample_tasks.add', '3', '4',
                 '--priority', '5', '--json')
    assert ranked.returncode == 0, ranked.stderr
    task_id = json.loads(ranked.stdout)['task_id']
    members = storage.conn.zrange(storage.priority_key, 0, -1)
    assert [message_priority(m) for m in members] == [5]
    first = producer.serializer.deserialize(storage.enqueued_items()[0])
    assert first.id == task_id and first.priority == 5
    assert producer.serializer.deserialize(message_data(members[0])).id == \
        task_id
    for bad in ('nan', 'inf', 'high'):
        refused = cli(env, 'submit', 'sample_tasks.add', '1', '2',
                      '--priority', bad)
        assert refused.returncode == 64, (bad, refused.stderr)
        assert '--priority' in refused.stderr, refused.stderr
    assert storage.queue_size() == 2   # the refusals enqueued nothing
