"""Issue 17, pause and resume: the workers of every consumer of the queue
finish what they run and take nothing new; the pause outlives consumer
restarts; a message a read took after the pause reached its consumer goes
back unstarted; it shows in /queue, /health (not a failure), /metrics,
`huey-worker status` and the consumer's STATUS= line; both idempotent and
logged in the queue's events.  Real consumers, the session's Redis."""
import json
import os
import signal
import uuid

import pytest

from ops_helpers import (Client, NotifySocket, cli, start_status_server,
                         task_record, wait_for_state, wait_until)
from task_module_helpers import consumer_env, task_module


TASKS = '''
from huey_worker import huey


@huey.task()
def quick(tag):
    huey.storage.conn.rpush('test:ran:' + tag, 'ran')
    return tag
'''


@pytest.fixture
def tasks(tmp_path, producer):
    with task_module(producer, tmp_path, TASKS, 'pausetasks') as module:
        module.env.update({'HUEY_STATUS_TOKEN': 't0ken',
                           'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5'})
        yield module


env_of = consumer_env


def ran(producer, tag):
    return producer.storage.conn.llen('test:ran:' + tag)


def heartbeat(producer, identity):
    raw = producer.storage.conn.get(producer.storage.keys.consumer(identity))
    return json.loads(raw) if raw else None


def beats_while_paused(producer, identity, count=3):
    """Wait for `count` more heartbeats of a consumer that reports itself
    paused: by then its workers have looked at the pause many times."""
    seen = []

    def more():
        info = heartbeat(producer, identity)
        if info and info.get('paused') and info['heartbeat'] not in seen:
            seen.append(info['heartbeat'])
        return len(seen) >= count
    wait_until(more, what='heartbeats of paused consumer %s' % identity)


def start_consumer(start_daemon, env, identity, workers=2, **extra):
    env = dict(env, HUEY_WORKER_CONSUMER_IDENTITY=identity,
               HUEY_WORKERS=str(workers),
               **{k: str(v) for k, v in extra.items()})
    daemon = start_daemon(['consumer'], env, identity)
    daemon.wait_for_output('consumer ready')
    return daemon


@pytest.mark.slow
def test_a_pause_outlives_a_restart_and_shows_everywhere(
        base_env, start_daemon, producer, tasks, tmp_path):
    env = env_of(base_env, tasks)
    run = cli(env, 'pause', '--reason', 'bad deploy')
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'paused by' in run.stdout and 'bad deploy' in run.stdout
    again = cli(env, 'pause', '--json')
    assert again.returncode == 0
    assert json.loads(again.stdout)['already'] is True

    notify = NotifySocket(tmp_path / 'notify')
    try:
        daemon = start_consumer(start_daemon, dict(
            env, NOTIFY_SOCKET=notify.path), 'one')
        daemon.wait_for_output('paused (by')
        notify.wait_for('queue paused')
    finally:
        notify.close()
    tag = uuid.uuid4().hex
    waiting = [tasks.quick(tag) for _ in range(3)]
    beats_while_paused(producer, 'one')
    assert ran(producer, tag) == 0
    assert all(task_record(producer, t.id)['state'] == 'pending'
               for t in waiting)

    _, port = start_status_server(start_daemon, env)
    client = Client(port, 't0ken')
    status, body = client.get('/queue')
    queue = body['queues'][producer.name]
    assert queue['paused'] is True and queue['pause']['reason'] == \
        'bad deploy' and queue['pending'] == 3
    status, body = client.get('/health')
    assert status == 200, body                  # not a failure
    assert body['checks']['queues'][producer.name]['paused'] is True
    assert any('paused' in w for w in body['warnings'])
    status, _, data = client.request('GET', '/metrics')
    assert 'huey_worker_queue_paused{queue="%s"} 1.0' % producer.name in \
        data.decode()
    status, index = client.get('/')
    assert {'POST /queue/pause', 'POST /queue/resume'} <= \
        set(index['routes'])
    run = cli(env, 'status')
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'paused' in run.stdout and 'bad deploy' in run.stdout

    # A restart: the new consumer starts paused.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    daemon = start_consumer(start_daemon, env, 'one')
    daemon.wait_for_output('paused (by')
    beats_while_paused(producer, 'one')
    assert ran(producer, tag) == 0

    assert client.json('POST', '/queue/resume', {}, auth=False)[0] == 401
    status, body = client.json('POST', '/queue/resume', {})
    assert status == 200 and body['already'] is False
    assert body['was']['reason'] == 'bad deploy'
    for task in waiting:
        wait_for_state(producer, task.id, 'complete')
    daemon.wait_for_output('resumed: workers take tasks again')
    status, body = client.json('POST', '/queue/resume', {})
    assert status == 200 and body['already'] is True
    run = cli(env, 'status', '--json')
    events = json.loads(run.stdout)['events'][producer.name]
    assert [e['action'] for e in events] == ['resume', 'pause']
    assert events[0]['via'] == 'http' and events[1]['via'] == 'cli'
    status, body = client.get('/queue')
    assert body['queues'][producer.name]['paused'] is False


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_a_pause_stops_every_consumer_of_the_queue(
        base_env, start_daemon, producer, tasks, worker_type):
    env = env_of(base_env, tasks, HUEY_WORKER_TYPE=worker_type)
    one = start_consumer(start_daemon, env, 'one')
    two = start_consumer(start_daemon, env, 'two')
    tag = uuid.uuid4().hex
    first = tasks.quick(tag)
    wait_for_state(producer, first.id, 'complete')

    _, port = start_status_server(start_daemon, env)
    client = Client(port, 't0ken')
    status, body = client.json('POST', '/queue/pause',
                               {'reason': 'maintenance'})
    assert status == 200 and body['paused'] is True, body
    one.wait_for_output('paused (by token')
    two.wait_for_output('paused (by token')
    later = [tasks.quick(tag) for _ in range(4)]
    beats_while_paused(producer, 'one')
    beats_while_paused(producer, 'two')
    assert ran(producer, tag) == 1
    assert producer.storage.queue_size() == 4

    run = cli(env, 'resume')
    assert run.returncode == 0 and 'resumed' in run.stdout, run.stdout
    for task in later:
        wait_for_state(producer, task.id, 'complete')
    assert ran(producer, tag) == 5


@pytest.mark.slow
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_a_message_taken_as_the_pause_lands_goes_back_unstarted(
        base_env, start_daemon, producer, tasks, redis_server, worker_type):
    """The worker is blocked in its queue read (a long read_timeout) when
    the pause reaches its consumer; a message enqueued then is taken by
    that read and must go back to the queue, not run, no delivery
    counted."""
    env = env_of(base_env, tasks, HUEY_WORKER_TYPE=worker_type,
                 HUEY_WORKER_CONSUMER_READ_TIMEOUT=30,
                 HUEY_WORKER_REDIS_SOCKET_TIMEOUT=45)
    daemon = start_consumer(start_daemon, env, 'one', workers=1)

    def blocked():
        with redis_server.client() as client:
            return [c for c in client.client_list()
                    if c.get('cmd') in ('brpoplpush', 'blmove')
                    and 'b' in c.get('flags', '')]
    wait_until(blocked, what="the worker's blocking queue read")
    assert cli(env, 'pause').returncode == 0
    daemon.wait_for_output('paused (by')
    tag = uuid.uuid4().hex
    late = tasks.quick(tag)
    daemon.wait_for_output('the queue is paused; a message its last queue '
                           'read took went back to the queue unstarted')
    assert ran(producer, tag) == 0
    assert producer.storage.conn.hget(producer.storage.keys.deliveries,
                                      late.id) is None
    record = task_record(producer, late.id)
    assert record['state'] == 'pending'
    assert 'running' not in [e['state'] for e in record['history']]
    assert [producer.deserialize_task(m).id
            for m in producer.storage.enqueued_items()] == [late.id]

    assert cli(env, 'resume').returncode == 0
    wait_for_state(producer, late.id, 'complete')
    assert ran(producer, tag) == 1
