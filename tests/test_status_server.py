"""The status endpoint as a real daemon over real HTTP, reading a real Redis
fed by real consumers: routes and shapes, auth, health rules, metrics
parsed with prometheus-client, limits, a fuzz pass, socket activation."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops_helpers import (Client, body_of, raw_request, start_status_server,
                         status_of, wait_for_state, wait_until)

import sample_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')


def metrics(client):
    status, headers, data = client.request('GET', '/metrics')
    assert status == 200
    assert headers['Content-Type'].startswith('text/plain')
    samples = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_reads_seed_shape_and_metrics(producer, env, start_daemon, tmp_path):
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    consumer.wait_for_output('consumer ready')
    status, body = client.get('/health')
    assert status == 200 and body['ready'] and body['reasons'] == []

    gate = tmp_path / 'gate'
    steps = sample_tasks.progress_steps(10, str(gate))
    later = sample_tasks.add.schedule((1, 1), delay=3600)
    done = sample_tasks.add(40, 2)
    failed = sample_tasks.boom()
    wait_for_state(producer, done.id, 'complete')
    wait_for_state(producer, failed.id, 'failed')

    # Progress of a running task, in the seed's shape.
    def halfway():
        status, body = client.get('/api/collect/task/%s' % steps.id)
        return body if body['log']['current'] == 5 else None
    body = wait_until(halfway, what='progress 5/10 over HTTP')
    assert set(body) == {'success', 'task_id', 'status', 'result',
                         'metadata', 'log'}
    assert body['success'] is True and body['task_id'] == steps.id
    assert body['status'] == 'running' and body['result'] is None
    assert body['metadata'] == {'last_step': 5, 'unit': 'items'}
    assert body['log']['message'] == 'step 5 of 10'
    assert body['log']['total'] == 10 and body['log']['percent'] == 50.0
    assert body['log']['status'] == 'running'
    assert body['log']['log_type'] == 'sample_tasks.progress_steps'

    # Workers: the consumer with its running task, from its heartbeat.
    def busy_worker():
        status, body = client.get('/workers')
        for c in body['consumers']:
            for w in c['workers']:
                if (w['current_task'] or {}).get('id') == steps.id:
                    return c
        return None
    consumer_info = wait_until(busy_worker, what='the busy worker')
    assert consumer_info['pid'] == consumer.pid and consumer_info['alive']
    assert consumer_info['host'] == os.uname().nodename
    assert consumer_info['started'] <= consumer_info['last_heartbeat']
    assert consumer_info['busy'] == 1 and consumer_info['idle'] == 1

    status, body = client.get('/queue')
    q = body['queues']['huey']
    assert status == 200
    assert (q['pending'], q['scheduled'], q['running'], q['dead_letters']) \
        == (0, 1, 1, 0)
    assert q['results_held'] == 2   # add's result and boom's error

    status, body = client.get('/tasks/%s' % later.id)
    assert status == 200 and body['state'] == 'scheduled'
    status, body = client.get('/tasks?state=complete&limit=5')
    assert [t['id'] for t in body['tasks']] == [done.id]

    gate.touch()
    wait_for_state(producer, steps.id, 'complete')
    status, body = client.get('/api/collect/task/%s' % steps.id)
    assert body['status'] == 'complete'
    assert body['result'] == {'steps': 10} and body['log']['current'] == 10
    status, body = client.get('/tasks/%s' % done.id)
    assert body['result'] == 42 and body['state'] == 'complete'

    assert client.get('/tasks/nope')[0] == 404
    status, body = client.get('/api/collect/task/nope')
    assert status == 404 and body['success'] is False
    # Without a token the write routes do not exist.
    assert not [r for r in client.get('/')[1]['routes']
                if r.startswith('POST')]
    status, body = client.json('POST', '/tasks', {'task': 'add'})
    assert status == 405 and 'POST' not in body['allowed']
    assert client.json('POST', '/tasks/%s/revoke' % later.id)[0] == 404

    samples = metrics(client)
    assert sample(samples, 'huey_worker_redis_up') == 1
    assert sample(samples, 'huey_worker_tasks_total', queue='huey',
                  task='sample_tasks.add', state='complete') == 1
    assert sample(samples, 'huey_worker_tasks_total', queue='huey',
                  task='sample_tasks.boom', state='failed') == 1
    assert sample(samples, 'huey_worker_task_duration_seconds_count',
                  queue='huey', task='sample_tasks.progress_steps') == 1
    assert sample(samples, 'huey_worker_task_duration_seconds_bucket',
                  queue='huey', task='sample_tasks.add', le='+Inf') == 1
    assert sample(samples, 'huey_worker_queue_scheduled', queue='huey') == 1
    assert sample(samples, 'huey_worker_consumers_live', queue='huey') == 1
    assert sample(samples, 'huey_worker_scheduler_leader', queue='huey') == 0
    ident = consumer_info['identity']
    assert sample(samples, 'huey_worker_worker_restarts_total', queue='huey',
                  consumer=ident) == 0


def test_metrics_right_in_process_mode(producer, env, start_daemon):
    env = dict(env, HUEY_WORKER_TYPE='process')
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    consumer.wait_for_output('consumer ready')
    done = sample_tasks.add(1, 2)
    failed = sample_tasks.boom()
    wait_for_state(producer, done.id, 'complete')
    wait_for_state(producer, failed.id, 'failed')

    def worker_pids():
        status, body = client.get('/workers')
        pids = [w['pid'] for c in body['consumers'] for w in c['workers']]
        return pids if len(pids) == 2 and all(pids) else None
    pids = wait_until(worker_pids, what='two worker pids')
    assert consumer.pid not in pids
    os.kill(pids[0], signal.SIGKILL)
    consumer.wait_for_output('restarting it')

    def restarted():
        samples = metrics(client)
        value = [v for (name, labels), v in samples.items()
                 if name == 'huey_worker_worker_restarts_total']
        return samples if value == [1] else None
    samples = wait_until(restarted, what='the restart to be counted')
    assert sample(samples, 'huey_worker_tasks_total', queue='huey',
                  task='sample_tasks.add', state='complete') == 1
    assert sample(samples, 'huey_worker_tasks_total', queue='huey',
                  task='sample_tasks.boom', state='failed') == 1
    busy_idle = [v for (name, labels), v in samples.items()
                 if name == 'huey_worker_workers']
    assert sum(busy_idle) == 2


def test_write_routes_need_the_token(producer, env, start_daemon):
    env = dict(env, HUEY_STATUS_TOKEN='s3cret-token')
    server, port = start_status_server(start_daemon, env)
    client = Client(port, token='s3cret-token')
    anonymous = Client(port)
    wrong = Client(port, token='s3cret-tokem')

    for c in (anonymous, wrong):
        status, headers, data = c.request('POST', '/tasks',
                                          {'task': 'add', 'args': [1, 2]})
        assert status == 401 and headers['WWW-Authenticate'].startswith(
            'Bearer')
    assert producer.storage.conn.llen(producer.storage.queue_key) == 0

    status, body = client.json('POST', '/tasks',
                               {'task': 'add', 'args': [1, 2]})
    assert status == 202 and body['task'] == 'sample_tasks.add'
    first = body['task_id']
    assert client.get('/tasks/%s' % first)[1]['state'] == 'pending'
    status, body = client.json('POST', '/tasks', {
        'task': 'sample_tasks.add', 'args': [3, 4], 'delay': 3600})
    assert status == 202 and body['state'] == 'scheduled'
    assert client.json('POST', '/tasks', {'task': 'nosuch'})[0] == 404
    for bad in ({'task': 'add', 'args': 'x'}, {'task': 'add', 'kwargs': []},
                {'task': 'add', 'color': 1}, {'task': 5}, [1],
                {'task': 'add', 'delay': -1}, {'task': 'add', 'id': 'a b'}):
        status, body = client.json('POST', '/tasks', bad)
        assert status == 400, bad
    status, _, data = client.request('POST', '/tasks', b'{not json',
                                     {'Content-Type': 'application/json'})
    assert status == 400 and b'not valid JSON' in data

    assert anonymous.json('POST', '/tasks/%s/revoke' % first)[0] == 401
    status, body = client.json('POST', '/tasks/%s/revoke' % first)
    assert status == 200 and body['revoked'] is True
    assert client.json('POST', '/tasks/unknown-id/revoke')[0] == 404

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert wait_for_state(producer, first, 'revoked')
    done = sample_tasks.add(5, 5)
    wait_for_state(producer, done.id, 'complete')
    status, body = client.json('POST', '/tasks/%s/revoke' % done.id)
    assert status == 409 and body['state'] == 'complete'


def test_health_rules(producer, env, start_daemon):
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/health')
    assert status == 503 and not body['ready']
    assert any('no live consumer' in r for r in body['reasons'])
    assert client.get('/health/live') == (200, {'status': 'ok',
                                                'live': True})

    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
        client.get('/health')), what='healthy')
    assert body['checks']['queues']['huey']['scheduler']['deployed'] is False

    # A scheduler that ran once and has no leader now is a fault.
    keys = producer.keys
    conn = producer.storage.conn
    conn.set(keys.scheduler_info, json.dumps({
        'leader': 'vm:1:abc', 'host': 'vm', 'pid': 1, 'since': time.time(),
        'last_slot': None}))
    status, body = client.get('/health')
    assert status == 503
    assert any('scheduler has no leader' in r for r in body['reasons'])
    conn.set(keys.scheduler_lease, 'vm:1:abc', px=60000)
    status, body = client.get('/health')
    assert status == 200
    assert body['checks']['queues']['huey']['scheduler']['leader'] == \
        'vm:1:abc'
    samples = metrics(client)
    assert sample(samples, 'huey_worker_scheduler_leader', queue='huey') == 1


def test_redis_down_is_503_not_a_crash(env, start_daemon):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead_port = s.getsockname()[1]
    env = dict(env, HUEY_REDIS_URL='redis://127.0.0.1:%d/0' % dead_port,
               HUEY_WORKER_REDIS_CONNECT_TIMEOUT='0.2')
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/health')
    assert status == 503 and body['checks']['redis']['ok'] is False
    for path in ('/queue', '/workers', '/tasks/abc', '/tasks'):
        status, body = client.get(path)
        assert status == 503 and 'Redis unavailable' in body['detail']
    samples = metrics(client)
    assert sample(samples, 'huey_worker_redis_up') == 0
    assert server.proc.poll() is None


FUZZ_PATHS = ['/', '/health', '/health/live', '/queue', '/workers',
              '/metrics', '/tasks', '/tasks/abc', '/tasks/abc/revoke',
              '/api/collect/task/abc', '/api/collect/task/', '/tasks/',
              '//', '/..', '/tasks/%00', '/tasks/%ZZ', '/%2e%2e/etc/passwd',
              '/tasks/' + 'a' * 300, '/tasks?limit=0', '/tasks?limit=x',
              '/tasks?state=bogus', '/tasks?queue=other', '/queue?x=1',
              '/tasks?limit=5&limit=6', '/tasks?%zz', '/metrics?', '*',
              'http://127.0.0.1/health', '/tasks/\u00e9t\u00e9']
FUZZ_METHODS = ['GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS', 'PATCH',
                'TRACE', 'CONNECT', 'get', 'BREW']


def _fuzz_request(rng, port):
    method = rng.choice(FUZZ_METHODS)
    path = rng.choice(FUZZ_PATHS)
    headers = [('Host', 'localhost')]
    roll = rng.random()
    body = b''
    if roll < 0.3:
        body = json.dumps(rng.choice([
            {'task': 'add', 'args': [1, 2]}, {'task': 'nosuch'}, [],
            {'task': 'add', 'args': [[[[1]]]], 'kwargs': {'a': None}},
            {'task': 'x' * 1000}, 'just a string', None, 12,
            {'task': 'add', 'delay': 1e308}])).encode()
    elif roll < 0.5:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
    if rng.random() < 0.5:
        headers.append(('Authorization', rng.choice([
            'Bearer fuzz-token', 'Bearer wrong', 'Basic abc', 'Bearer',
            'bearer fuzz-token', 'Bearer fuzz-token\u00e9'])))
    if rng.random() < 0.2:
        headers.append(('X-' + 'h' * rng.randint(1, 50),
                        'v' * rng.randint(0, 2000)))
    if rng.random() < 0.1:
        headers.append(('Transfer-Encoding', 'chunked'))
        body = b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body) if \
            rng.random() < 0.5 else b'zz\r\n' + body
    elif body or method in ('POST', 'PUT'):
        length = len(body) if rng.random() < 0.9 else rng.choice(
            [0, len(body) + 5, -1, 'x'])
        headers.append(('Content-Length', str(length)))
    head = '%s %s HTTP/1.1\r\n' % (method, path)
    head += ''.join('%s: %s\r\n' % h for h in headers) + '\r\n'
    data = head.encode('utf-8') + body
    if rng.random() < 0.05:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
    return data


def test_bad_requests_limits_and_fuzz(producer, env, start_daemon):
    env = dict(env, HUEY_STATUS_TOKEN='fuzz-token',
               HUEY_WORKER_STATUS_MAX_BODY_BYTES='2000',
               HUEY_WORKER_STATUS_REQUEST_TIMEOUT='1.5')
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    server, port = start_status_server(start_daemon, env)
    consumer.wait_for_output('consumer ready')
    client = Client(port, token='fuzz-token')
    wait_until(lambda: client.get('/health')[0] == 200, what='healthy')

    answer = raw_request(port, b'POST /tasks HTTP/1.1\r\nHost: x\r\n'
                               b'Authorization: Bearer fuzz-token\r\n'
                               b'Content-Length: 5000\r\n\r\n' + b'x' * 5000)
    assert status_of(answer) == 413
    assert json.loads(body_of(answer))['status'] == 413
    answer = raw_request(port, b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' +
                         b'a' * 40000 + b'\r\n\r\n')
    assert status_of(answer) == 431
    answer = raw_request(port, b'NONSENSE\r\n\r\n')
    assert status_of(answer) == 400 and b'"error"' in answer
    answer = raw_request(port, b'GET /health HTTP/1.1\r\nHost: x\r\n',
                         shut=False)    # never finishes its headers
    assert status_of(answer) == 408
    answer = raw_request(port, b'HEAD /queue HTTP/1.1\r\nHost: x\r\n\r\n')
    assert status_of(answer) == 200 and body_of(answer) == b''
    status, headers, _ = client.request('OPTIONS', '/queue')
    assert status == 405 and headers['Allow'] == 'GET, HEAD'

    rng = random.Random(20261122)
    seen = {}
    for _ in range(300):
        request = _fuzz_request(rng, port)
        answer = raw_request(port, request)
        status = status_of(answer)
        assert status is not None and 200 <= status < 500, (request[:300],
                                                            answer[:300])
        if status != 200 and body_of(answer):   # HEAD answers have none
            assert 'error' in json.loads(body_of(answer))
        seen[status] = seen.get(status, 0) + 1
    assert {200, 400, 401, 404, 405} <= set(seen), seen
    assert server.proc.poll() is None
    assert client.get('/health')[0] == 200
    assert 'Traceback' not in server.output()


def test_slow_and_half_open_clients_do_not_block(env, start_daemon):
    env = dict(env, HUEY_WORKER_STATUS_REQUEST_TIMEOUT='120')
    server, port = start_status_server(start_daemon, env)
    idle = []
    try:
        for i in range(40):   # ten times the handler threads
            s = socket.create_connection(('127.0.0.1', port), timeout=5)
            if i % 2:
                s.sendall(b'GET /queue HTTP/1.1\r\nHost: x\r\n')  # half
            else:
                s.sendall(b'POST /tasks HTTP/1.1\r\nHost: x\r\n'
                          b'Content-Length: 100\r\n\r\nabc')     # slow body
            idle.append(s)
        # Each of them holds its connection for up to two minutes; a
        # normal client is still answered (this client gives up far
        # sooner than that).
        for _ in range(5):
            answer = raw_request(port, b'GET /health/live HTTP/1.1\r\n'
                                       b'Host: x\r\n\r\n', timeout=10)
            assert status_of(answer) == 200
    finally:
        for s in idle:
            s.close()


def test_socket_activation_and_sd_notify(env, tmp_path):
    notify_path = str(tmp_path / 'notify.sock')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    env = dict(env, NOTIFY_SOCKET=notify_path,
               HUEY_WORKER_STATUS_PORT='1')   # ignored: systemd's socket wins
    log = open(tmp_path / 'activated.log', 'wb')
    # As systemd does: the socket on fd 3, LISTEN_PID naming the daemon.
    proc = subprocess.Popen(
        ['/bin/sh', '-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m daemon '
                          'status-server 3<&0 0</dev/null', sys.executable],
        stdin=listener.fileno(), stdout=log, stderr=subprocess.STDOUT,
        env=env, cwd=ROOT, start_new_session=True)
    try:
        messages = notify.recv(4096).decode()
        assert 'READY=1' in messages
        listener.close()   # the daemon holds its own copy
        answer = raw_request(port, b'GET /health/live HTTP/1.1\r\n'
                                   b'Host: x\r\n\r\n')
        assert status_of(answer) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert 'STOPPING=1' in notify.recv(4096).decode()
        assert 'socket activation' in (tmp_path / 'activated.log').read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()


def test_port_in_use_and_bad_address_exit_codes(env, start_daemon):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    try:
        daemon = start_daemon(['status-server', '--port',
                               str(taken.getsockname()[1])], env, 'taken')
        assert daemon.wait(30) == 69
        assert 'already in use' in daemon.output()
    finally:
        taken.close()
    daemon = start_daemon(['status-server', '--port', '0', '--set',
                           'status.bind=192.0.2.1'], env, 'badbind')
    assert daemon.wait(30) == 78
    assert '[status] port' in daemon.output()


def test_sighup_reloads_the_token(producer, env, start_daemon):
    server, port = start_status_server(start_daemon, env)
    client = Client(port, token='new-token')
    assert client.json('POST', '/tasks', {'task': 'add'})[0] == 405
    with open(env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[status]\ntoken = new-token\n')
    server.signal(signal.SIGHUP)
    server.wait_for_output('configuration reloaded')
    status, body = client.json('POST', '/tasks', {'task': 'add',
                                                  'args': [1, 2]})
    assert status == 202
    assert wait_for_state(producer, body['task_id'], 'pending')
