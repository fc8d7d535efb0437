"""The status endpoint as a real daemon over real HTTP, reading a real Redis
fed by real consumers: routes and shapes, auth, health rules, metrics
parsed with prometheus-client, limits, request framing (the fuzz pass is
test_status_fuzz.py), kept-alive connections, a flood of slow clients, a
Redis restart, socket activation, and the token beyond loopback."""
import collections
import datetime
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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
    # add's result and boom's error (counted in the worker, sent within a
    # second or two: journal.counters)
    wait_until(lambda: client.get('/queue')[1]['queues']['huey'][
        'results_held'] == 2, what='the results counted')

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

    # The outcomes' counts are summed in the worker and sent within a
    # second or two (journal.counters).
    def counted():
        s = metrics(client)
        return s if sample(s, 'huey_worker_task_duration_seconds_count',
                           queue='huey', task='sample_tasks.progress_steps') \
            == 1 and sample(s, 'huey_worker_tasks_total', queue='huey',
                            task='sample_tasks.boom', state='failed') == 1 \
            and sample(s, 'huey_worker_tasks_total', queue='huey',
                       task='sample_tasks.add', state='complete') == 1 \
            else None
    samples = wait_until(counted, what='the outcomes counted')
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

    def counted():
        samples = metrics(client)
        return sample(samples, 'huey_worker_tasks_total', queue='huey',
                      task='sample_tasks.boom', state='failed') == 1 and \
            sample(samples, 'huey_worker_tasks_total', queue='huey',
                   task='sample_tasks.add', state='complete') == 1
    # Each worker sums its counts and sends them within a second or two
    # (journal.counters); once sent they outlive the worker.
    wait_until(counted, what='both outcomes counted')
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
    status, body = client.json('POST', '/tasks', {
        'task': 'sample_tasks.add', 'args': [5, 6], 'priority': 7})
    assert status == 202
    storage = producer.storage
    from huey_worker.storage import message_data, message_priority
    ranked, = storage.conn.zrange(storage.priority_key, 0, -1)
    assert message_priority(ranked) == 7
    assert producer.serializer.deserialize(message_data(ranked)).id == \
        body['task_id']
    assert client.json('POST', '/tasks', {'task': 'nosuch'})[0] == 404
    for bad in ({'task': 'add', 'args': 'x'}, {'task': 'add', 'kwargs': []},
                {'task': 'add', 'color': 1}, {'task': 5}, [1],
                {'task': 'add', 'delay': -1}, {'task': 'add', 'id': 'a b'},
                {'task': 'add', 'priority': 'high'},
                {'task': 'add', 'priority': True},
                {'task': 'add', 'priority': 1e400}):
        status, body = client.json('POST', '/tasks', bad)
        assert status == 400, bad
    status, _, data = client.request('POST', '/tasks', b'{not json',
                                     {'Content-Type': 'application/json'})
    assert status == 400 and b'not valid JSON' in data
    status, body = client.get('/tasks?limit=1&limit=2')
    assert status == 400 and 'given twice' in body['detail'], body

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

    # No scheduler ever, as huey_consumer users are used to: a retry due
    # for long waits for ever, and health says so.
    storage = producer.storage
    past = datetime.datetime.utcnow() - datetime.timedelta(seconds=60)
    soon = datetime.datetime.utcnow() + datetime.timedelta(seconds=60)
    storage.add_to_schedule(b'a retry due a minute ago', past)
    storage.add_to_schedule(b'a task due in a minute', soon)
    status, body = client.get('/health')
    assert status == 503
    assert any('1 delayed or retrying task(s) due for over 10s and no '
               'scheduler runs' in r for r in body['reasons']), body
    conn_ = storage.conn
    conn_.zremrangebyscore(storage.schedule_key, '-inf', '+inf')
    assert client.get('/health')[0] == 200

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


def test_bad_requests_and_limits(producer, env, start_daemon):
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

    # Framing: where a request ends is never guessed.
    post = (b'POST /tasks HTTP/1.1\r\nHost: x\r\n'
            b'Authorization: Bearer fuzz-token\r\n')
    for request, expected in [
            (post + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"tas\r\n'
                    b'D;x=y\r\nk": "nosuch"}\r\n0\r\nTrailer: 1\r\n\r\n', 404),
            (post + b'Transfer-Encoding: chunked\r\n\r\n3\r\nabcX', 400),
            # A chunk not followed by CRLF (h11 before 0.16 let it pass).
            (b'GET /health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: '
             b'chunked\r\n\r\n3\r\nabcXY0\r\n\r\n', 400),
            (post + b'Transfer-Encoding: chunked\r\n\r\n800\r\n' +
             b'x' * 0x800, 413),
            (post + b'Content-Length: 3\r\nTransfer-Encoding: chunked\r\n'
                    b'\r\n3\r\nabc\r\n0\r\n\r\n', 400),
            # Refused by the server, not by the route (h11 would read it
            # as chunked, and this one would then be a 200).
            (b'GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n'
             b'Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n', 400),
            (post + b'Transfer-Encoding: gzip\r\n\r\n', 501),
            (post + b'Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd',
             400),
            (post + b'Content-Length: ' + b'9' * 5000 + b'\r\n\r\n', 400),
            (b'GET /health/live HTTP/1.1\r\n\r\n', 400),   # no Host
            (b'GET /health/live HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n',
             400),
            # obs-fold: h11 joins the folded line to the field value, the
            # other choice RFC 9112 5.2 allows besides a 400.
            (b'GET /health/live HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n',
             200),
            (b'GET /health/live HTTP/2.0\r\nHost: x\r\n\r\n', 505),
            (b'GET /health/live HTTP/1.1\nHost: x\n\n', 200),   # bare LF
            # h11 does not skip an empty line before the request line.
            (b'\r\nGET /health/live HTTP/1.1\r\nHost: x\r\n\r\n', 400)]:
        answer = raw_request(port, request)
        assert status_of(answer) == expected, (request[:200], answer)
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(post + b'Content-Length: 18\r\nExpect: 100-continue\r\n'
                         b'\r\n')
        assert s.recv(100) == b'HTTP/1.1 100 Continue\r\n\r\n'
        s.sendall(b'{"task": "nosuch"}')
        assert status_of(s.recv(65536)) == 404
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(post + b'Content-Length: 5000\r\nExpect: 100-continue'
                         b'\r\n\r\n')
        assert status_of(s.recv(65536)) == 413   # and no 100 first

    assert server.proc.poll() is None
    assert client.get('/health')[0] == 200
    assert 'Traceback' not in server.output()


def test_slow_and_half_open_clients_do_not_block(env, start_daemon):
    env = dict(env, HUEY_WORKER_STATUS_REQUEST_TIMEOUT='120',
               HUEY_WORKER_STATUS_HEAD_TIMEOUT='120')
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
        ['/bin/sh', '-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m huey_worker '
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


def test_beyond_loopback_needs_the_token(env, start_daemon, tmp_path):
    """Bound beyond loopback: no start without a token (78, naming the
    settings and the file), and with one every read needs it but
    liveness; a reload that drops it is refused."""
    config_file = env['HUEY_WORKER_CONFIG']
    with open(config_file, 'w') as fh:
        fh.write('[status]\nbind = 0.0.0.0\n')
    daemon = start_daemon(['status-server', '--port', '0'], env, 'open')
    assert daemon.wait(30) == 78
    output = daemon.output()
    assert '[status] bind = \'0.0.0.0\' (%s:2)' % config_file in output
    assert 'beyond loopback and [status] token is not set' in output
    assert 'Set [status] token (in %s' % config_file in output

    with open(config_file, 'w') as fh:
        fh.write('[status]\nbind = 0.0.0.0\ntoken = s3cret\n')
    daemon = start_daemon(['status-server', '--port', '0'], env, 'guarded')
    daemon.wait_for_output('status endpoint listening on')
    port = int(re.search(r'listening on http://0\.0\.0\.0:(\d+)/',
                         daemon.output()).group(1))
    # A guessable token beyond loopback is warned about, never shown.
    assert '[status] token (%s:3) is 6 characters long' % config_file in \
        daemon.output()
    assert 's3cret' not in daemon.output()
    anyone, holder = Client(port), Client(port, token='s3cret')
    for path in ('/', '/queue', '/tasks', '/metrics', '/health'):
        status, headers, _ = anyone.request('GET', path)
        assert status == 401 and 'Bearer' in headers['WWW-Authenticate']
        assert anyone.request('GET', path, headers={
            'Authorization': 'Bearer nope'})[0] == 401
        assert holder.request('GET', path)[0] in (200, 503), path
    assert anyone.get('/health/live')[0] == 200
    # A reload may change the token, not drop it.
    with open(config_file, 'w') as fh:
        fh.write('[status]\nbind = 0.0.0.0\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_output('configuration not reloaded')
    assert anyone.request('GET', '/queue')[0] == 401
    assert holder.request('GET', '/queue')[0] == 200
    assert check_exposure_of(tmp_path, '0.0.0.0', 's3cret') is None


def test_a_token_no_client_can_send_is_refused(env):
    for token in ('ab\ncd', 'two words', 'tab\there', 'caf\u00e9'):
        check = subprocess.run(
            [sys.executable, '-m', 'huey_worker', 'config', '--check'],
            env=dict(env, HUEY_STATUS_TOKEN=token), capture_output=True,
            text=True, timeout=60)
        assert check.returncode == 78, (token, check.stderr)
        assert "[status] token = '********' (env HUEY_STATUS_TOKEN)" in \
            check.stderr
        assert 'no client can send' in check.stderr
        assert token not in check.stderr


def test_config_check_refuses_an_open_bind(env):
    with open(env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[status]\nbind = 0.0.0.0\n')
    check = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'config', '--check'], env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 78, check.stderr
    assert "[status] bind = '0.0.0.0' (%s:2)" % env['HUEY_WORKER_CONFIG'] \
        in check.stderr
    assert 'token is not set' in check.stderr


def check_exposure_of(tmp_path, bind, token=''):
    """check_exposure's ConfigError text for these settings, or None."""
    from huey_worker import config
    from huey_worker.status.server import check_exposure
    empty = tmp_path / 'empty.ini'
    empty.touch()
    cfg = config.load(str(empty), environ={}, overrides=[
        ('status.bind', bind, '--set'), ('status.token', token, '--set')])
    try:
        check_exposure(cfg)
    except config.ConfigError as exc:
        return str(exc)
    return None


def test_which_addresses_are_loopback(tmp_path):
    for bind in ('127.0.0.1', '127.0.0.2', '::1', 'localhost'):
        assert check_exposure_of(tmp_path, bind) is None, bind
    for bind in ('0.0.0.0', '::'):
        error = check_exposure_of(tmp_path, bind)
        assert error.startswith("[status] bind = '%s' (cli --set)" % bind)
        assert 'token is not set' in error


def test_activated_socket_beyond_loopback_needs_the_token(env, tmp_path):
    listener = socket.socket()
    listener.bind(('0.0.0.0', 0))
    listener.listen(16)
    log_path = tmp_path / 'activated.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            ['/bin/sh', '-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m '
                              'huey_worker status-server 3<&0 0</dev/null',
             sys.executable],
            stdin=listener.fileno(), stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=ROOT, start_new_session=True)
    listener.close()
    try:
        assert proc.wait(30) == 78
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert '[status] token (default): the socket systemd passed (0.0.0.0:' \
        in output


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


# -- persistent connections ---------------------------------------------------

class Conn:
    """A client connection kept open across requests."""

    def __init__(self, port):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=10)
        self.file = self.sock.makefile('rb')

    def send(self, data):
        self.sock.sendall(data)

    def answer(self, head=False):
        """(status, headers, body) of the next answer; None when the server
        closed the connection instead."""
        line = self.file.readline()
        if not line:
            return None
        headers = {}
        while True:
            header = self.file.readline().decode('latin-1').rstrip('\r\n')
            if not header:
                break
            name, _, value = header.partition(': ')
            headers[name] = value
        body = b'' if head else self.file.read(int(headers['Content-Length']))
        return int(line.split()[1]), headers, body

    def get(self, path, extra=b''):
        self.send(b'GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n' % (path.encode(),
                                                                extra))
        return self.answer()

    def closed_by_server(self):
        try:
            return self.file.read(1) == b''
        except ConnectionResetError:
            return True

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_keep_alive_serves_many_requests_on_one_connection(producer, env,
                                                          start_daemon):
    server, port = start_status_server(start_daemon, env)
    pending = sample_tasks.add(1, 2)   # no consumer: it stays pending
    wait_for_state(producer, pending.id, 'pending')
    with Conn(port) as c:
        status, headers, body = c.get('/health/live')
        assert status == 200 and headers['Connection'] == 'keep-alive'
        assert 'timeout=' in headers['Keep-Alive']
        status, _, body = c.get('/tasks/%s' % pending.id)
        assert status == 200 and json.loads(body)['state'] == 'pending'
        assert c.get('/tasks/nope')[0] == 404
        assert c.get('/queue?bogus=1')[0] == 400
        c.send(b'HEAD /queue HTTP/1.1\r\nHost: x\r\n\r\n')
        status, headers, body = c.answer(head=True)
        assert status == 200 and int(headers['Content-Length']) > 0
        # Requests sent together (pipelined): answers in order.
        c.send(b'GET /tasks/nope HTTP/1.1\r\nHost: x\r\n\r\n'
               b'GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n'
               b'GET /tasks/%s HTTP/1.1\r\nHost: x\r\n\r\n'
               % pending.id.encode())
        assert [c.answer()[0] for _ in range(3)] == [404, 200, 200]
        # A body read to its end leaves the connection usable.
        c.send(b'POST /health/live HTTP/1.1\r\nHost: x\r\n'
               b'Content-Length: 3\r\n\r\nabc')
        assert c.answer()[0] == 405
        c.send(b'POST /health/live HTTP/1.1\r\nHost: x\r\n'
               b'Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n')
        assert c.answer()[0] == 405
        assert c.get('/health/live')[0] == 200
        # Connection: close is honoured.
        status, headers, _ = c.get('/health/live', b'Connection: close\r\n')
        assert status == 200 and headers['Connection'] == 'close'
        assert c.closed_by_server()

    # The per-connection cap: the last answer it allows says close.
    with Conn(port) as c:
        for n in range(1, 1000):
            status, headers, _ = c.get('/health/live')
            assert status == 200
            if headers['Connection'] == 'close':
                break
        assert n == 100 and c.closed_by_server()

    # HTTP/1.0 closes, even with Connection: keep-alive (h11 keeps no
    # HTTP/1.0 connection alive).
    with Conn(port) as c:
        c.send(b'GET /health/live HTTP/1.0\r\n\r\n')
        assert c.answer()[1]['Connection'] == 'close'
        assert c.closed_by_server()
    with Conn(port) as c:
        c.send(b'GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n')
        assert c.answer()[1]['Connection'] == 'close'
        assert c.closed_by_server()
    # A malformed request ends its connection (where would the next
    # one start?).
    with Conn(port) as c:
        c.send(b'GET /health/live HTTP/1.1\r\nHost: x\r\n'
               b'Content-Length: zz\r\n\r\n')
        assert c.answer()[0] == 400 and c.closed_by_server()
    # Python's http.client (and requests.Session) reuse the connection.
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    try:
        conn.request('GET', '/health/live')
        conn.getresponse().read()
        first = conn.sock
        conn.request('GET', '/queue')
        assert conn.getresponse().status == 200 and conn.sock is first
    finally:
        conn.close()
    assert 'Traceback' not in server.output()


def test_keep_alive_idle_timeout_and_slow_clients(env, start_daemon):
    env = dict(env, HUEY_WORKER_STATUS_REQUEST_TIMEOUT='1.5')
    server, port = start_status_server(start_daemon, env)
    with Conn(port) as idle, Conn(port) as slow:
        assert idle.get('/health/live')[0] == 200
        assert slow.get('/health/live')[0] == 200
        # A kept-alive client that starts its next request and stalls
        # holds no thread: everyone else is answered meanwhile.
        slow.send(b'GET /health/live HTTP/1.1\r\nHo')
        started = time.monotonic()
        for path in ('/health/live', '/queue', '/tasks/nope'):
            with Conn(port) as other:
                assert other.get(path)[0] in (200, 404)
        assert time.monotonic() - started < 1.0
        # The stalled request gets its 408 once request_timeout is over;
        # the idle connection is closed without an answer.
        status, headers, body = slow.answer()
        assert status == 408 and json.loads(body)['status'] == 408
        assert headers['Connection'] == 'close'
        assert idle.answer() is None
        assert 1.0 < time.monotonic() - started < 5.0
    assert server.proc.poll() is None


def test_head_timeout_is_shorter_than_the_request_timeout(env,
                                                         start_daemon):
    """A request head must be whole within [status] head_timeout of its
    first byte, on a new connection or a kept-alive one; a body, once the
    head is in, has the rest of request_timeout."""
    env = dict(env, HUEY_WORKER_STATUS_REQUEST_TIMEOUT='60',
               HUEY_WORKER_STATUS_HEAD_TIMEOUT='1')
    server, port = start_status_server(start_daemon, env)
    with Conn(port) as head, Conn(port) as body, Conn(port) as kept:
        head.send(b'GET /queue HTTP/1.1\r\nHo')
        body.send(b'POST /health/live HTTP/1.1\r\nHost: x\r\n'
                  b'Content-Length: 10\r\n\r\nab')
        assert kept.get('/health/live')[0] == 200
        kept.send(b'GET /health/live HTTP/1.1\r\n')
        for conn in (head, kept):
            status, headers, data = conn.answer()
            assert status == 408 and headers['Connection'] == 'close'
            assert '([status] head_timeout)' in json.loads(data)['detail']
            assert conn.closed_by_server()
        body.send(b'cdefghij')
        status, headers, _ = body.answer()
        assert status == 405 and headers['Connection'] == 'keep-alive'


def test_idle_kept_alive_connections_make_room(env, start_daemon):
    """All connection slots held by idle kept-alive clients: a new client
    is still served, and the longest idle one is closed for it."""
    env = dict(env, HUEY_WORKER_STATUS_REQUEST_TIMEOUT='60',
               HUEY_WORKER_STATUS_MAX_CONNECTIONS_PER_CLIENT='1000')
    server, port = start_status_server(start_daemon, env)
    held = []
    try:
        for _ in range(256):   # httpserver.MAX_CONNECTIONS
            held.append(Conn(port))
            assert held[-1].get('/health/live')[0] == 200
        newcomers = [Conn(port) for _ in range(3)]
        held += newcomers
        for c in newcomers:   # each takes the slot of an idle one
            assert c.get('/health/live')[0] == 200
        assert all(c.closed_by_server() for c in held[:3])
        assert held[3].get('/health/live')[0] == 200
    finally:
        for c in held:
            c.close()


# -- a flood of slow clients -------------------------------------------------

class SlowFlood:
    """`count` clients that each send a request head one byte a second,
    never finishing it, and connect again when the server closes them:
    the slowloris attack, from one address."""

    HEAD = (b'GET /queue HTTP/1.1\r\nHost: x\r\n' +
            b''.join(b'X-Slow-%d: %s\r\n' % (i, b'z' * 40) for i in range(64)))

    def __init__(self, port, count):
        self.port, self.count = port, count
        self.clients = {}   # socket -> bytes sent
        self.connects = self.ticks = 0
        self.answers = collections.Counter()   # detail of each 408, 503
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        for _ in range(self.count):
            self._connect()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)
        for s in self.clients:
            s.close()

    def _connect(self):
        s = socket.create_connection(('127.0.0.1', self.port), timeout=5)
        s.setblocking(False)
        s.send(self.HEAD[:1])   # the server accepts it on its first byte
        self.clients[s] = 1
        self.connects += 1

    @staticmethod
    def why(answer):
        """What an eviction's 408 says it made room for; else its start."""
        try:
            detail = json.loads(body_of(answer))['detail']
        except (ValueError, KeyError):
            return answer[:40]
        return detail.partition(' make room ')[2] or detail

    def _run(self):
        while not self.stopping.wait(1.0):
            self.ticks += 1
            for s, sent in list(self.clients.items()):
                try:
                    answer = s.recv(65536)
                    closed = True   # an answer (408, 503) or the end
                    if answer:
                        self.answers[self.why(answer)] += 1
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if not closed:
                    try:
                        s.send(self.HEAD[sent:sent + 1])
                        self.clients[s] = sent + 1
                        continue
                    except OSError:
                        pass
                del self.clients[s]
                s.close()
                try:
                    self._connect()
                except OSError:
                    pass   # the backlog is full: next second


def probe(port):
    """The status of GET /health/live on a new connection; None when the
    connection broke without one."""
    try:
        return status_of(raw_request(port, b'GET /health/live HTTP/1.1\r\n'
                                           b'Host: x\r\n\r\n', timeout=10))
    except OSError:
        return None


@pytest.mark.parametrize('per_client, eviction', [
    (None, 'for another from 127.0.0.1 ([status] '
           'max_connections_per_client = 64)'),
    (1000, '(all 256 connection slots taken)')],
    ids=['per-client-limit', 'slots-limit'])
def test_liveness_answers_through_a_flood_of_slow_clients(
        env, start_daemon, per_client, eviction):
    """300 clients each sending a request head a byte a second, more than
    the 256 connection slots: every liveness probe is answered, and a
    poller's kept-alive connection keeps working.  With the per-client
    limit raised above the slots, it is the slots' eviction that holds."""
    if per_client:
        env = dict(env, HUEY_WORKER_STATUS_MAX_CONNECTIONS_PER_CLIENT=str(
            per_client))
    server, port = start_status_server(start_daemon, env)
    probes, answered = 200, 0
    with Conn(port) as poller:
        assert poller.get('/queue')[0] == 200
        with SlowFlood(port, 300) as flood:
            wait_until(lambda: flood.ticks >= 3, what='the flood under way')
            for n in range(probes):
                answered += probe(port) == 200
                if n % 10 == 0:
                    status, headers, _ = poller.get('/queue')
                    assert status == 200 and \
                        headers['Connection'] == 'keep-alive', n
                time.sleep(0.02)
    # Slow clients were turned away by the limit this case is about.
    assert flood.answers[eviction] > 0, flood.answers
    assert answered == probes
    assert server.proc.poll() is None
    assert 'Traceback' not in server.output()


def test_redis_restart_and_outage_seen_by_kept_connections(tmp_path, env,
                                                          start_daemon):
    """The handler threads keep a Redis connection each: a restart of Redis
    costs no request an error, an outage is a 503 (liveness still 200),
    and service comes back with Redis."""
    from huey_worker.devredis import EmbeddedRedis
    redis_server = EmbeddedRedis(str(tmp_path / 'redis'),
                                 persist=False).start()

    def crash_redis():   # quicker than a clean shutdown, and harsher
        redis_server.process.kill()
        redis_server.process.wait()
        redis_server.process = None
    try:
        env = dict(env, HUEY_REDIS_URL=redis_server.url,
                   HUEY_WORKER_REDIS_CONNECT_TIMEOUT='0.2')
        server, port = start_status_server(start_daemon, env)
        with Conn(port) as c:
            for _ in range(40):   # so every handler thread has connected
                assert c.get('/tasks/nope')[0] == 404
            crash_redis()
            redis_server.start()
            for path in ['/tasks/nope'] * 20 + ['/queue', '/workers']:
                assert c.get(path)[0] in (200, 404), path
            crash_redis()
            assert c.get('/tasks/nope')[0] == 503
            assert c.get('/health')[0] == 503
            assert c.get('/health/live')[0] == 200
            redis_server.start()
            assert c.get('/tasks/nope')[0] == 404
        assert 'Traceback' not in server.output()
    finally:
        redis_server.cleanup()
