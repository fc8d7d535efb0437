"""Helpers for the journal, status endpoint and CLI tests: waiting for a
condition, running the CLI, talking HTTP to a real status-server, reading
the journal."""
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout=20, interval=0.05, what='condition'):
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError('timed out waiting for %s (last: %r)' % (what, last))


@contextlib.contextmanager
def monitored(redis_server, conn):
    """Yields the list MONITOR fills with every command the server runs
    while the block runs; `conn` ends the watch (ECHO stop-monitor) after
    the block, once the last replies had time to show."""
    entries, ready = [], threading.Event()

    def watch():
        client = redis_server.client()
        with client.monitor() as m:
            ready.set()
            for entry in m.listen():
                entries.append(entry)
                if entry['command'] == 'ECHO stop-monitor':
                    break
        client.close()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    try:
        yield entries
    finally:
        time.sleep(0.3)
        conn.echo('stop-monitor')
        thread.join(10)


def cli(env, *args, timeout=120):
    """`python -m huey_worker ARGS...` with the environment `env`, run from
    the checkout's root as an operator runs a command: its
    CompletedProcess (returncode; stdout and stderr as text).  A command
    still running after `timeout` seconds raises
    subprocess.TimeoutExpired, failing the test instead of hanging it."""
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start_status_server(start_daemon, env, extra_args=(), name='status'):
    """A real `huey-worker status-server` on a free port; returns
    (daemon, port)."""
    daemon = start_daemon(['status-server', '--port', '0'] + list(extra_args),
                          env, name)
    daemon.wait_for_output('status endpoint listening on')
    port = int(re.search(r'listening on http://127\.0\.0\.1:(\d+)/',
                         daemon.output()).group(1))
    return daemon, port


class Client:
    def __init__(self, port, token=None):
        self.port, self.token = port, token

    def request(self, method, path, body=None, headers=None, auth=True):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=15)
        headers = dict(headers or {})
        if auth and self.token:
            headers.setdefault('Authorization', 'Bearer %s' % self.token)
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            headers.setdefault('Content-Type', 'application/json')
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def json(self, method, path, body=None, **kwargs):
        status, headers, data = self.request(method, path, body, **kwargs)
        assert headers.get('Content-Type', '').startswith(
            'application/json'), (status, headers, data)
        return status, json.loads(data)

    def get(self, path, **kwargs):
        return self.json('GET', path, **kwargs)


def raw_request(port, data, timeout=10, shut=True):
    """Send raw bytes; return the whole answer (b'' if none)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b''.join(chunks)


def status_of(answer):
    match = re.match(rb'HTTP/1\.1 (\d{3}) ', answer)
    return int(match.group(1)) if match else None


def body_of(answer):
    return answer.partition(b'\r\n\r\n')[2]


def task_record(producer, task_id):
    from huey_worker import journal
    return journal.read_task(producer, producer.storage, task_id)


def wait_for_state(producer, task_id, states, timeout=20):
    states = (states,) if isinstance(states, str) else tuple(states)

    def check():
        record = task_record(producer, task_id)
        return record if record and record['state'] in states else None
    return wait_until(check, timeout, what='task %s to be %s' % (
        task_id, '/'.join(states)))


def history_states(record):
    return [event['state'] for event in record.get('history', ())]


class NotifySocket:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []

    def drain(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return self.messages
            self.messages.append(data.decode())

    def wait_for(self, needle, timeout=30):
        def seen():
            self.drain()
            return [m for m in self.messages if needle in m]
        return wait_until(seen, timeout, what='%r on NOTIFY_SOCKET '
                                                 '(got %r)' % (needle,
                                                               self.messages))

    def close(self):
        self.sock.close()


def delivery_env(base_env, **extra):
    """base_env for delivery tests: sample_tasks and delivery_tasks loaded,
    a heartbeat every 0.5 s, a dead consumer recovered after 3 s; `extra`
    (VARIABLE=value) wins."""
    env = dict(base_env, HUEY_MODULES='sample_tasks,delivery_tasks',
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.5',
               HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='3')
    env.update({k: str(v) for k, v in extra.items()})
    return env
