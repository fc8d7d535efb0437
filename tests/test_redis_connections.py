"""Every way the suite reaches Redis, each against a real redis-server:
password (the seeds' URL form and REDIS_PASSWORD), unix socket, TLS
(rediss:// with a CA file), and Sentinel."""
import os
import signal
import subprocess
import time

import pytest
import redis

from huey_worker.devredis import die_with_parent, find_redis_server, free_port


class Server:
    def __init__(self, directory, args, client_kwargs):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.proc = subprocess.Popen(
            [find_redis_server()] + args + ['--dir', directory, '--save', '',
                                            '--appendonly', 'no'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent)
        client = redis.Redis(socket_connect_timeout=0.3, protocol=2,
                             **client_kwargs)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.RedisError:
                    assert self.proc.poll() is None, 'redis-server exited'
                    assert time.monotonic() < deadline, \
                        'redis-server not ready'
                    time.sleep(0.05)
        except BaseException:
            self.stop()   # not handed to the fixture yet: stop it here
            raise
        self.client = client

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


def run_one_task(start_daemon, base_env, client, **env):
    """Start a consumer with `env`, enqueue a task through `client`, and
    return its result as the consumer stored it."""
    import sample_tasks
    from huey_worker.app import huey
    full_env = dict(base_env)
    for name in ('HUEY_REDIS_URL',):
        full_env.pop(name, None)
    full_env.update(env)
    daemon = start_daemon(['consumer', '--workers', '1'], full_env)
    daemon.wait_for_output('consumer ready', 30)
    task = sample_tasks.add.s(20, 22)
    client.lpush('huey.redis.huey', huey.serialize_task(task))
    deadline = time.monotonic() + 20
    while not client.exists('huey.r.huey.' + task.id):
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.05)
    value = huey.serializer.deserialize(client.get('huey.r.huey.' + task.id))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert 'Traceback' not in daemon.output()
    return value, daemon.output()


def test_password_in_the_seed_url_form_and_in_redis_password(
        tmp_path, servers, base_env, start_daemon):
    port = free_port()
    server = Server(str(tmp_path / 'pw'), ['--port', str(port), '--bind',
                                           '127.0.0.1', '--requirepass',
                                           's3cret'],
                    {'port': port, 'password': 's3cret'})
    servers.append(server)
    value, out = run_one_task(start_daemon, base_env, server.client,
                              HUEY_REDIS_URL='redis://:s3cret@127.0.0.1:%d'
                              % port)
    assert value == 42
    assert 's3cret' not in out  # the URL is logged without its password
    assert 'redis://:***@127.0.0.1:%d' % port in out
    value, out = run_one_task(start_daemon, base_env, server.client,
                              REDIS_HOST='127.0.0.1', REDIS_PORT=str(port),
                              REDIS_PASSWORD='s3cret')
    assert value == 42 and 's3cret' not in out


def test_unix_socket(tmp_path, servers, base_env, start_daemon):
    sock = str(tmp_path / 'redis.sock')
    server = Server(str(tmp_path / 'unix'), ['--port', '0', '--unixsocket',
                                             sock, '--unixsocketperm', '700'],
                    {'unix_socket_path': sock})
    servers.append(server)
    value, _ = run_one_task(start_daemon, base_env, server.client,
                            HUEY_REDIS_URL='unix://%s' % sock)
    assert value == 42


def make_certificates(directory):
    def openssl(*args):
        subprocess.run(['openssl'] + list(args), check=True, cwd=directory,
                       capture_output=True)
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
            '-subj', '/CN=test-ca', '-keyout', 'ca.key', '-out', 'ca.crt')
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost',
            '-keyout', 'server.key', '-out', 'server.csr')
    with open(os.path.join(directory, 'san.ext'), 'w') as fh:
        fh.write('subjectAltName=DNS:localhost,IP:127.0.0.1\n')
    openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey',
            'ca.key', '-CAcreateserial', '-days', '2', '-out', 'server.crt',
            '-extfile', 'san.ext')
    return {name: os.path.join(directory, name)
            for name in ('ca.crt', 'server.crt', 'server.key')}


def test_tls_with_a_ca_file(tmp_path, servers, base_env, start_daemon):
    certs = make_certificates(str(tmp_path))
    port = free_port()
    server = Server(str(tmp_path / 'tls'), [
        '--port', '0', '--tls-port', str(port), '--bind', '127.0.0.1',
        '--tls-cert-file', certs['server.crt'], '--tls-key-file',
        certs['server.key'], '--tls-ca-cert-file', certs['ca.crt'],
        '--tls-auth-clients', 'no'],
        {'port': port, 'ssl': True, 'ssl_ca_certs': certs['ca.crt']})
    servers.append(server)
    value, _ = run_one_task(
        start_daemon, base_env, server.client,
        HUEY_REDIS_URL='rediss://127.0.0.1:%d/0' % port,
        HUEY_WORKER_REDIS_TLS_CA_FILE=certs['ca.crt'])
    assert value == 42


def test_sentinel_finds_the_master(tmp_path, servers, base_env,
                                   start_daemon):
    port, sentinel_port = free_port(), free_port()
    master = Server(str(tmp_path / 'master'), ['--port', str(port), '--bind',
                                               '127.0.0.1'], {'port': port})
    servers.append(master)
    conf = tmp_path / 'sentinel.conf'
    conf.write_text('port %d\nbind 127.0.0.1\nsentinel monitor mymaster '
                    '127.0.0.1 %d 1\n' % (sentinel_port, port))
    sentinel = Server(str(tmp_path / 'sentinel'), [str(conf), '--sentinel'],
                      {'port': sentinel_port})
    servers.append(sentinel)
    value, out = run_one_task(
        start_daemon, base_env, master.client,
        REDIS_SENTINELS='127.0.0.1:%d' % sentinel_port,
        REDIS_SENTINEL_MASTER='mymaster')
    assert value == 42
    assert 'sentinel master mymaster via 127.0.0.1:%d' % sentinel_port in out
